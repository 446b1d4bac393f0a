"""
The public names of fractal.store's core modules: importable where ported
Axiom code looks for them, and documented.
"""

from __future__ import annotations

import importlib

from twisted.trial.unittest import SynchronousTestCase

_MODULES = [
    "fractal.store",
    "fractal.store.attributes",
    "fractal.store.errors",
    "fractal.store.interfaces",
    "fractal.store.item",
    "fractal.store.query",
    "fractal.store.queryutil",
    "fractal.store.store",
    "fractal.store.upgrade",
]

# Names ported Axiom code imports, by module.
_AXIOM_NAMES = {
    "fractal.store.item": [
        "Item", "declareLegacyItem", "transacted", "empowerment", "POWERUP_BEFORE",
        "POWERUP_AFTER", "Placeholder", "Empowered",
    ],
    "fractal.store.attributes": [
        "text", "bytes", "integer", "boolean", "ieee754_double", "point1decimal", "point2decimal",
        "point3decimal", "point4decimal", "point5decimal", "point6decimal", "point7decimal",
        "point8decimal", "point9decimal", "point10decimal", "money", "timestamp", "reference",
        "path", "textlist", "inmemory", "AND", "OR", "compoundIndex", "ConstraintError",
        "InvalidPathError", "SQLAttribute",
    ],
    "fractal.store.store": ["Store", "AtomicFile"],
    "fractal.store.errors": [
        "ItemNotFound", "DuplicateUniqueItem", "NoCrossStoreReferences", "DeletionDisallowed",
        "BrokenReference", "ChangeRejected", "NoInheritance", "UnknownItemType",
        "NoUpgradePathAvailable", "ItemUpgradeError", "UpgraderRecursion", "CannotOpenStore",
    ],
    "fractal.store.interfaces": [
        "IScheduler", "IPowerupIndirector", "IColumn", "IComparison", "IOrdering", "IQuery",
        "IBeneficiary",
    ],
    "fractal.store.upgrade": [
        "registerUpgrader", "registerAttributeCopyingUpgrader", "registerDeletionUpgrader",
    ],
    "fractal.store.queryutil": ["contains", "overlapping", "AttributeTuple"],
}


class ExportTests(SynchronousTestCase):
    """
    __all__ and the Axiom names.
    """

    def test_allImportableAndDocumented(self) -> None:
        """
        Every name in each module's __all__ exists, and classes and functions
        have docstrings.
        """
        for name in _MODULES:
            module = importlib.import_module(name)
            self.assertTrue(module.__doc__, name)
            for public in module.__all__:
                value = getattr(module, public)
                if callable(value) and getattr(value, "__module__", "").startswith("fractal"):
                    self.assertTrue(getattr(value, "__doc__", None), "%s.%s" % (name, public))

    def test_axiomNames(self) -> None:
        """
        The names ported code imports from Axiom's modules exist in the
        matching fractal modules.
        """
        for name, names in _AXIOM_NAMES.items():
            module = importlib.import_module(name)
            for public in names:
                self.assertTrue(hasattr(module, public), "%s.%s" % (name, public))

    def test_timeExported(self) -> None:
        """
        Time is importable from fractal.store and fractal.store.attributes.
        """
        import fractal.store
        import fractal.store.attributes

        self.assertIs(fractal.store.Time, fractal.store.attributes.Time)
