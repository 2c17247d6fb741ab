"""Lazy attributes of a package (PEP 562), so `import lm` does not import tfds, grain, orbax or flax."""
import importlib


def attributes(package: str, attrs: dict, modules: tuple):
    """`(__getattr__, __dir__)` for `package`: `attrs` maps a name to the module that defines it, `modules`
    are submodule names; each is imported on first use and then cached in the package's namespace."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name):
        if name in attrs:
            value = getattr(importlib.import_module(attrs[name]), name)
        elif name in modules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(attrs) | set(modules))

    return __getattr__, __dir__
