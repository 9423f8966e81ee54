"""Network definitions, the lowest layer: the RORem discriminator and its folder's file names."""
