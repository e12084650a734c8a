"""The closed-form solve: the Procrustes problem and its polar-factor methods."""
