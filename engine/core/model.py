"""``dockyard.core.model`` (Azure ML's ``azureml.core.model``): not implemented here; every name says
what to do instead (one clear ``NotSupportedHere``, also a ``NotImplementedError``)."""

__all__: list = []


def __getattr__(name):  # type: ignore[no-untyped-def]
    from dockyard._azure_only import not_here

    raise not_here("dockyard.core", name) if name[:1].isupper() else AttributeError(name)
