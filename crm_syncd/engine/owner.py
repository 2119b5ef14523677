"""The owner's own addresses: texts and calls to them are notes to self, no one's interaction."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable

from crm_syncd.identity import Normalizer
from crm_syncd.sources.contacts import OwnAddress
from crm_syncd.store import Store

OWN_ADDRESSES = "own_addresses_by_store"  # kv: {AddressBook store: the owner's addresses its cards give, normalised}


class OwnAddresses:
    """The Me cards' addresses (a number taken off the Me card is someone's again), and those of the
    owner's cards linked to one and those chat.db's chats were last addressed from, unless another card
    holds them (an office's main line, an old number of the owner's given away). The contacts pass and
    extraction's worker thread both update them."""

    def __init__(self, store: Store, normalize: Normalizer) -> None:
        self._store = store
        self._normalize = normalize
        # AddressBook store → the owner's addresses its cards give, as last read (by this process or, for a
        # store it has not read, an earlier one: a run that reads no address book, a store unreadable just now)
        self._me: dict[str, set[str]] = {name: set(own) for name, own in store.get(OWN_ADDRESSES, {}).items()}
        self._named: dict[str, set[str]] = {}  # messages, calls → the owner's addresses they name
        self._lock = threading.Lock()
        self.addresses: frozenset[str] = frozenset()

    def __contains__(self, address: str) -> bool:
        return address in self.addresses

    def stores_present(self, stores: Iterable[str]) -> None:
        """Forget the Me cards of AddressBook stores that are gone (an account removed, even before this
        process). No AddressBook at all (`stores` empty) leaves them as they were."""
        stores = set(stores)
        if stores:
            for name in self._me.keys() - stores:
                del self._me[name]

    def read_me(self, store: str, raw: Iterable[OwnAddress] | None, linked: Iterable[OwnAddress] = (),
                held: Collection[str] = frozenset()) -> None:
        """A store's Me cards' addresses as just read, each with its number's country (None: the store is
        gone), and those of the owner's cards there linked to a Me card, but for those `held` (normalised
        addresses another person's card holds too: an office's main line is the colleague's)."""
        if raw is None:
            self._me.pop(store, None)
        else:
            self._me[store] = self.normalized(raw) | (self.normalized(linked) - set(held))

    def normalized(self, raw: Iterable[OwnAddress]) -> set[str]:
        return {a for value, country in raw if (a := self._normalize.person(value, country))}

    def me_read(self) -> None:
        """The contacts pass has read the stores: keep what changed, and recompute."""
        if (me := {name: sorted(own) for name, own in self._me.items()}) != self._store.get(OWN_ADDRESSES, {}):
            self._store.put(OWN_ADDRESSES, me, durable=False)
        self._recompute()

    def named_by(self, source: str, raw: Iterable[str]) -> None:
        """The owner's addresses a source's database names (chat.db's `last_addressed_handle`)."""
        self._named[source] = {a for a in map(self._normalize.person, raw) if a}
        self._recompute()

    def _recompute(self) -> None:
        with self._lock:
            named = set().union(*self._named.values())
            self.addresses = frozenset(set().union(*self._me.values()) | (named - self._store.on_cards(named)))
