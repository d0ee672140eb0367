"""Providers: the only code that reads or changes live state. Each third-party client lives in one subpackage."""
