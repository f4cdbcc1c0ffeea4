"""EndpointPickerConfig: the loader, the registry of plugin types and the built-in strategies."""
