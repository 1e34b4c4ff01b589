"""The package version: a leaf module, readable anywhere without importing the package root."""

__version__ = "0.1.0"
