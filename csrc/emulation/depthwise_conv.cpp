// The emulation build of csrc/depthwise_conv.cu: the same source, compiled by the host C++ compiler against
// cuda_emulation.h (VITKERN_EMULATION is set by setup.py).
#include "depthwise_conv.cu"
