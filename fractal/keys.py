# -*- test-case-name: tests.test_keys -*-
"""
User keys: validation, the slot a key hashes to, and the name of its store.

A user key is the routing key of every user command.  It is any C{str} of 1 to
255 UTF-8 bytes with no control characters, compared exactly (no case folding
or normalisation).  A key is hashed with SHA-256, which is stable across
processes, platforms and Python versions (unlike L{hash}), both to pick its slot
and to name its store on disk.  The raw key never becomes part of a path.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = [
    "DEFAULT_SLOTS",
    "MAX_KEY_BYTES",
    "InvalidUserKey",
    "validateKey",
    "keyDigest",
    "slotForKey",
    "storeNameForKey",
    "isStoreName",
    "checkStoreName",
    "slotOfStoreName",
]

DEFAULT_SLOTS = 4096
"""
The default number of slots in a cluster.  The slot count is fixed for the
life of a cluster: changing it moves almost every user.
"""

MAX_KEY_BYTES = 255
"""
The longest user key, in UTF-8 bytes.
"""


class InvalidUserKey(ValueError):
    """
    A user key is not acceptable.  The message says why, without echoing more
    than a short, printable prefix of the key.
    """


def _describe(key: object) -> str:
    """
    A short, safe description of a rejected key for error messages.
    """
    text = repr(key)
    if len(text) > 40:
        text = text[:37] + "..."
    return text


def validateKey(key: object) -> str:
    """
    Check that C{key} is an acceptable user key and return it unchanged.

    @param key: the candidate key.
    @return: C{key}, when it is valid.
    @raise InvalidUserKey: if C{key} is not a C{str}, is empty, is longer than
        L{MAX_KEY_BYTES} in UTF-8, cannot be encoded as UTF-8 (lone
        surrogates), or contains a NUL or any other control character.
    """
    if not isinstance(key, str):
        raise InvalidUserKey(f"user key must be str, not {type(key).__name__}")
    if not key:
        raise InvalidUserKey("user key must not be empty")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidUserKey(f"user key {_describe(key)} is not valid UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidUserKey(
            f"user key is {len(encoded)} bytes of UTF-8; the limit is {MAX_KEY_BYTES}"
        )
    for index, char in enumerate(key):
        if unicodedata.category(char) == "Cc":
            raise InvalidUserKey(
                f"user key {_describe(key)} has control character "
                f"U+{ord(char):04X} at position {index}"
            )
    return key


def keyDigest(key: str) -> bytes:
    """
    The SHA-256 digest of a valid key's UTF-8 bytes.

    @param key: a key accepted by L{validateKey}.
    @raise InvalidUserKey: if C{key} is not valid.
    """
    return hashlib.sha256(validateKey(key).encode("utf-8")).digest()


def slotForKey(key: str, slots: int = DEFAULT_SLOTS) -> int:
    """
    The slot, in C{range(slots)}, that C{key} belongs to.

    @param key: a key accepted by L{validateKey}.
    @param slots: the cluster's slot count.
    @raise InvalidUserKey: if C{key} is not valid.
    @raise ValueError: if C{slots} is not positive.
    """
    return _slotOfDigest(keyDigest(key), slots)


def _slotOfDigest(digest: bytes, slots: int) -> int:
    """
    The slot of a key whose digest (L{keyDigest}) is C{digest}: its first 8
    bytes, modulo C{slots}.

    @raise ValueError: if C{slots} is not positive.
    """
    if slots < 1:
        raise ValueError(f"slot count must be positive, not {slots!r}")
    return int.from_bytes(digest[:8], "big") % slots


def storeNameForKey(key: str) -> str:
    """
    The directory name of C{key}'s store: 64 lowercase hexadecimal digits.

    The name is derived only from a hash of the key, so no key, however
    hostile, can name a path outside the data directory.

    @param key: a key accepted by L{validateKey}.
    @raise InvalidUserKey: if C{key} is not valid.
    """
    return keyDigest(key).hex()


_STORE_NAME = re.compile(r"\A[0-9a-f]{64}\Z")


def isStoreName(name: object) -> bool:
    """
    Whether C{name} is a store name: 64 lowercase hexadecimal digits, as made
    by L{storeNameForKey}.
    """
    return isinstance(name, str) and _STORE_NAME.match(name) is not None


def checkStoreName(store: str) -> str:
    """
    Check that C{store} is a store name (64 lowercase hexadecimal digits, as
    made by L{storeNameForKey}) and return it.

    @raise ValueError: if it is not.
    """
    if not isStoreName(store):
        raise ValueError(f"not a store name: {store!r:.80}")
    return store


def slotOfStoreName(store: str, slots: int) -> int:
    """
    The slot of the store named C{store}: the same as L{slotForKey} of its
    key, since a store's name is the hex digest of its key
    (L{storeNameForKey}).

    @param store: a store name: 64 lowercase hexadecimal digits.
    @param slots: the cluster's slot count.
    @raise ValueError: if C{store} is not a store name, or C{slots} is not
        positive.
    """
    return _slotOfDigest(bytes.fromhex(checkStoreName(store)), slots)
