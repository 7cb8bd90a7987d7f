"""mmproxy: a PROXY-protocol gateway that gives applications the real client address."""

__version__ = "0.1.0"
