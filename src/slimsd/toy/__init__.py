"""The toy world: the procedural shapes data, the trained toy teacher, and ``slimsd demo`` built on them."""
