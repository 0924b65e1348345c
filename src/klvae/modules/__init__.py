"""Plain-torch building blocks (no Lightning imports): network, posterior, losses, discriminator."""
