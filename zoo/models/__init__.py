"""One module per model family. Each registers itself with ``zoo.registry.register``; every module
here is imported by ``zoo.list_models()``, so a new file joins the registry and the harness."""
