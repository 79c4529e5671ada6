"""Built-in components. Each module is a plugin registered through lisa_kit's own
``lisa_kit`` entry points, the same path a third-party package uses."""
