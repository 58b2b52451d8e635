"""Settings for cxr-screen, read from the environment (prefix ``CXR_``)."""

from config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
