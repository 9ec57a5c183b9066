"""pyro-cvae: the conditional VAE of Sohn, Lee & Yan (2015) in Pyro."""

__version__ = "0.1.0"
