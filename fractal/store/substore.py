# -*- test-case-name: tests.test_store_substore -*-
"""
Stores inside stores: the per-user store pattern.

A L{SubStore} item in a site store names a complete store directory under the
site store's files area.  L{SubStore.open} opens it (once; later calls give
the same L{Store}), with C{parent} set to the site store and C{idInParent}
to the item's storeID.  Adapting the item to an interface adapts the opened
store, and the item is an L{IPowerupIndirector}, so powering the site store
up with it exposes the user store's powerups.

Unlike Axiom, an opened substore can be closed with L{SubStore.close} and
opened again later, so a process serving many users need not keep one file
open per user it has ever seen.
"""

from __future__ import annotations

from typing import Any, Sequence

from zope.interface import implementer

from fractal.store.attributes import inmemory, path
from fractal.store.interfaces import IPowerupIndirector
from fractal.store.item import Item
from fractal.store.store import Store

__all__ = ["SubStore"]


@implementer(IPowerupIndirector)
class SubStore(Item):
    """
    A store nested in another one.

    @ivar storepath: the substore's directory, relative to the parent store's
        files directory on disk; L{None} for an in-memory substore.
    @ivar substore: the open L{Store}, or L{None} while it is closed.
    """

    typeName = "substore"
    schemaVersion = 1

    storepath = path(doc="The substore's directory, under the parent's files directory.")
    substore = inmemory(doc="The open Store, or None.")

    def activate(self) -> None:
        """
        Start closed.
        """
        self.substore = None

    @classmethod
    def createNew(cls, store: Store, pathSegments: Sequence[str]) -> SubStore:
        """
        Create a substore and the item that names it.

        On a store with a directory the new store lives at C{pathSegments}
        under C{store.filesdir}; each segment must be a plain name (no
        separator, no C{..}).  On an in-memory store the substore is in
        memory too.  The new store is opened and closed once, so its
        directory exists when this returns.

        @param store: the parent store.
        @param pathSegments: the directory names below the parent's files
            directory, e.g. C{("account", "example.com", "alice.axiom")}.
        @return: the new L{SubStore}, stored in C{store}.
        @raise ValueError: C{pathSegments} is a string rather than a
            sequence of strings, is empty, or has an empty, C{.} or C{..}
            segment.
        @raise twisted.python.filepath.InsecurePath: a segment holds a path
            separator.
        """
        if isinstance(pathSegments, (str, bytes)):
            raise ValueError(f"Received {pathSegments!r} instead of a sequence of path segments.")
        segments = list(pathSegments)
        if store.dbdir is None:
            self = cls(store=store, storepath=None)
        else:
            storepath = store.newFilePath(*segments)
            storepath.parent().makedirs(ignoreExistingDirectory=True)
            self = cls(store=store, storepath=storepath)
        self._open(None, create=True)
        self.close()
        return self

    def isOpen(self) -> bool:
        """
        @return: whether L{open} has been called and L{close} not since.
        """
        return self.substore is not None

    def open(self, debug: bool | None = None) -> Store:
        """
        Open the substore, or return it if it is already open.

        The store's C{parent} is this item's store and its C{idInParent} this
        item's storeID; it inherits the parent's C{debug} and C{journalMode},
        and, when this open creates its database, the page size of the
        parent's database.  While it is open, the store keeps this item in
        memory, so every lookup of the item finds the same open store.

        @param debug: whether the substore prints its SQL; by default the
            parent's setting.
        @return: the open L{Store}.
        @raise fractal.store.errors.StoreNotFound: the substore's directory
            is gone; an empty store is not silently made in its place.
        """
        return self._open(debug, create=False)

    def _open(self, debug: bool | None, create: bool) -> Store:
        """
        Open the substore; see L{open}.

        @param create: whether a missing directory is created.
        """
        if self.substore is not None:
            return self.substore  # type: ignore[no-any-return]
        parent = self.store
        if debug is None:
            debug = parent.debug
        kw: dict[str, Any] = dict(
            parent=parent,
            idInParent=self.storeID,
            debug=debug,
            journalMode=parent.journalMode,
            pageSize=parent.querySQL("PRAGMA page_size")[0][0],
        )
        if self.storepath is None:
            filesdir = parent.filesdir
            if filesdir is not None:
                kw["filesdir"] = filesdir.child("_substore_files").child(str(self.storeID))
            opened = Store(**kw)
        else:
            opened = Store(self.storepath, create=create, **kw)
        # The back-reference keeps this item (and so its in-memory
        # attribute) alive while the store is open: the weak item cache will
        # not build a second SubStore for the same row and open the same
        # file twice.
        opened._openSubStore = self  # type: ignore[attr-defined]
        self.substore = opened
        return opened

    def close(self) -> None:
        """
        Close the substore if it is open; L{open} will open it again.

        An in-memory substore is kept: closing it would destroy it.
        """
        opened = self.substore
        if opened is None or self.storepath is None:
            return
        self.substore = None
        opened._openSubStore = None
        opened.close()

    def deleted(self) -> None:
        """
        Close the substore when its item is deleted.  Its directory is left
        on disk.
        """
        super().deleted()
        opened = self.substore
        if opened is not None:
            self.substore = None
            opened._openSubStore = None
            opened.close()

    def __conform__(self, interface: Any) -> Any:
        """
        Adapt the opened substore to C{interface}.

        @return: C{interface(self.open(), None)}.
        """
        return interface(self.open(), None)

    def indirect(self, interface: Any) -> Any:
        """
        Stand in, as a powerup, for the substore's own powerup.

        @param interface: the interface a powerup was asked for.
        @return: the substore's first powerup for C{interface}.
        """
        return interface(self)
