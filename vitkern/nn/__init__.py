"""Drop-in modules running on vitkern ops."""
