// The emulation build of csrc/attention.cu: the same source, compiled by the host C++ compiler against
// cuda_emulation.h (VITKERN_EMULATION is set by setup.py).
#include "attention.cu"
