"""
Tests for L{fractal.keys}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fractal.keys import (
    MAX_KEY_BYTES,
    InvalidUserKey,
    checkStoreName,
    isStoreName,
    slotForKey,
    slotOfStoreName,
    storeNameForKey,
    validateKey,
)


class ValidateKeyTests(SynchronousTestCase):
    """
    Tests for L{validateKey}.
    """

    def test_plainKey(self) -> None:
        """
        An ordinary key, including non-ASCII text, is returned unchanged.
        """
        self.assertEqual(validateKey("alice@example.com"), "alice@example.com")
        self.assertEqual(validateKey("Ünïcødé ✓"), "Ünïcødé ✓")

    def test_empty(self) -> None:
        """
        The empty string is refused.
        """
        self.assertRaises(InvalidUserKey, validateKey, "")

    def test_longestKey(self) -> None:
        """
        A key of exactly L{MAX_KEY_BYTES} UTF-8 bytes is accepted and one byte
        more is refused, counting bytes rather than characters.
        """
        validateKey("a" * MAX_KEY_BYTES)
        self.assertRaises(InvalidUserKey, validateKey, "a" * (MAX_KEY_BYTES + 1))
        # 'é' is two bytes in UTF-8.
        self.assertRaises(InvalidUserKey, validateKey, "é" * 128)

    def test_controlCharacters(self) -> None:
        """
        NUL and every other control character are refused.
        """
        for char in ["\x00", "\n", "\t", "\x1f", "\x7f", "\x85"]:
            self.assertRaises(InvalidUserKey, validateKey, f"a{char}b")

    def test_notText(self) -> None:
        """
        Bytes and other non-C{str} values are refused.
        """
        self.assertRaises(InvalidUserKey, validateKey, b"alice")
        self.assertRaises(InvalidUserKey, validateKey, None)

    def test_loneSurrogate(self) -> None:
        """
        A string that cannot be encoded as UTF-8 is refused.
        """
        self.assertRaises(InvalidUserKey, validateKey, "a\udc80")

    def test_errorDoesNotEchoLongKeys(self) -> None:
        """
        The error message quotes at most a short prefix of a rejected key.
        """
        error = self.assertRaises(InvalidUserKey, validateKey, "\x00" + "x" * 1000)
        self.assertLess(len(str(error)), 120)


class SlotTests(SynchronousTestCase):
    """
    Tests for L{slotForKey}.
    """

    def test_stable(self) -> None:
        """
        The slot of a key is a fixed function of its bytes, the same in every
        process: these values are part of the on-disk and wire contract.
        """
        self.assertEqual(slotForKey("alice"), 175)
        self.assertEqual(slotForKey("bob", 16), 10)

    def test_range(self) -> None:
        """
        Slots lie in C{range(slots)} and a non-positive slot count is refused.
        """
        for i in range(200):
            self.assertIn(slotForKey(f"user{i}", 7), range(7))
        self.assertRaises(ValueError, slotForKey, "alice", 0)

    def test_invalidKey(self) -> None:
        """
        An invalid key has no slot.
        """
        self.assertRaises(InvalidUserKey, slotForKey, "")


class StoreNameTests(SynchronousTestCase):
    """
    Tests for L{storeNameForKey}, L{isStoreName}, L{checkStoreName} and
    L{slotOfStoreName}.
    """

    def test_slotOfStoreName(self) -> None:
        """
        L{slotOfStoreName} gives a store's slot from its name, as
        L{slotForKey} gives it from the key; a name that is not a store's
        (L{isStoreName}) is refused by it and by L{checkStoreName}.
        """
        for key in ("alice", "bob@example.com", "\u00e9t\u00e9", "x" * 255):
            for slots in (1, 7, 16, 4096):
                name = storeNameForKey(key)
                self.assertTrue(isStoreName(name))
                self.assertEqual(slotOfStoreName(name, slots), slotForKey(key, slots))
        for name in ("../etc", "A" * 64, "a" * 63, "a" * 64 + "\n"):
            self.assertFalse(isStoreName(name))
            self.assertRaises(ValueError, checkStoreName, name)
            self.assertRaises(ValueError, slotOfStoreName, name, 4)

    def test_hostileKeys(self) -> None:
        """
        Keys that look like paths give plain hexadecimal names.
        """
        for key in ["../../etc/passwd", "/", ".", "..", "a/b", "C:\\x"]:
            name = storeNameForKey(key)
            self.assertEqual(len(name), 64)
            self.assertEqual(name.strip("0123456789abcdef"), "")

    @given(st.text(min_size=1, max_size=60))
    def test_nameIsHexOrRefused(self, key: str) -> None:
        """
        Any string either is refused as a key or names a hexadecimal store.
        """
        try:
            name = storeNameForKey(key)
        except InvalidUserKey:
            return
        self.assertRegex(name, "^[0-9a-f]{64}$")

    def test_exactComparison(self) -> None:
        """
        Keys are compared exactly: case differences name different stores.
        """
        self.assertNotEqual(storeNameForKey("Alice"), storeNameForKey("alice"))
