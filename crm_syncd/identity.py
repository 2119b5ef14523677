"""Who is who: address normalisation, card merging, CRM field rules and matching.

Phones become E.164 (via phonenumbers and the default region), emails are trimmed and
lower-cased; both sides (Apple's and the CRM's) go through the same `Normalizer`, so a CRM
phone typed as "(902) 555-1234" matches a chat.db handle "+19025551234".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import getaddresses
from itertools import combinations
from dataclasses import dataclass, field
from typing import NamedTuple

import phonenumbers
from phonenumbers import PhoneNumberFormat, ValidationResult

from crm_syncd.sources import Card, Phone

PEOPLE = frozenset({"phone", "email"})
PLACEHOLDER_FIRST = "Unknown"
PLACEHOLDER_NOTE = "Auto-created by crm-syncd - needs review"
MISSING_NAME = "-"  # fills the CRM's mandatory name part a card does not have
COMPANY_LAST = "(company)"  # last name of a company card: first name is the organisation
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
# what the CRM takes as an email (Citadel validates with Zod 3's z.string().email(), in ASCII)
_CRM_EMAIL = re.compile(r"(?!\.)(?!.*\.\.)[A-Za-z0-9_'+\-.]*[A-Za-z0-9_+\-]@([A-Za-z0-9][A-Za-z0-9\-]*\.)+[A-Za-z]{2,}")
_DIGITS = re.compile(r"^[\d\s().\-]+$")
_INTERNATIONAL = re.compile(r"^\+\d{8,15}$")  # a number as Apple stores handles: E.164's shape
# a per-call caller-ID code dialled before a number: `*67` hides, `*82` shows the caller's number (North
# America), `#31#` and `*31#` likewise (GSM); only before what looks like a number (UK's `141` is not taken:
# too many numbers begin so)
_CALLER_ID = re.compile(r"(?:\*67|\*82|[#*]31#)\s*(?=\+?[\d(][\d\s().\-]*$)")
# Mexico's prefixes dropped in 2019, which address books and chat.db still hold and phonenumbers' metadata no
# longer strips: a mobile's `1` after the country code (`+52 1 55 …`), and at home `044`/`045` (mobiles), `01`
_MX_INTERNATIONAL, _MX_NATIONAL = frozenset({"1"}), frozenset({"044", "045", "01"})
_WITH_COUNTRY_CODE = frozenset({phonenumbers.CountryCodeSource.FROM_NUMBER_WITH_PLUS_SIGN,
                                phonenumbers.CountryCodeSource.FROM_NUMBER_WITH_IDD,
                                phonenumbers.CountryCodeSource.FROM_NUMBER_WITHOUT_PLUS_SIGN})
_BEFORE_PASTED_EMAIL = frozenset(' \t<"\'[(:')  # what may stand just before an address pasted with more around it
# the direction marks a right-to-left text puts around an address: LRM, RLM, ALM, embeddings, overrides, isolates
_DIRECTION_MARKS = dict.fromkeys([0x200E, 0x200F, 0x061C, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])
_MOBILE_LABELS = frozenset({"mobile", "iphone", "cell"})
_REGIONS = phonenumbers.SUPPORTED_REGIONS
NOTES_MAX_CHARS = 100_000  # a note pasted with a book in it still fits the CRM's 5 MiB body (≤ 6 bytes a char)


class Address(NamedTuple):
    """A classified counterpart address."""

    kind: str  # phone | email | short-code | sender-id | business | invalid
    value: str  # E.164 phone, lower-case email, or the stripped raw text for non-people


class Normalizer:
    """Classifies and normalises raw addresses, caching each distinct input once."""

    def __init__(self, region: str = "US") -> None:
        self.region = region.upper()
        self._cache: dict[str | tuple[str, str], Address] = {}

    def __call__(self, raw: str | None, country: object = None) -> Address:
        """`country`: where a number without a country code is from (a card's or a call's), if not this region."""
        if raw is None:
            return Address("invalid", "")
        region = country.upper() if isinstance(country, str) and country.upper() in _REGIONS else self.region
        key = raw if region == self.region else (raw, region)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._classify(raw, region)
        return found

    def person(self, raw: str | None, country: object = None) -> str | None:
        """The normalised value if `raw` is a person's phone or email, else None."""
        address = self(raw, country)
        return address.value if address.kind in PEOPLE else None

    def _classify(self, raw: str, region: str) -> Address:
        text = raw.translate(_DIRECTION_MARKS).strip()
        if not text or len(text) > 320:
            return Address("invalid", text[:320])
        lowered = text.lower()
        if lowered.startswith("urn:biz:"):
            return Address("business", text)
        if lowered.startswith("mailto:"):
            lowered = lowered[7:]
        if "@" in lowered:
            return _email(lowered)
        dialled = text[found.end():] if (found := _CALLER_ID.match(text)) else text
        number = self._parse_phone(dialled, region)
        if number is not None:
            e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
            # E.164 allows 15 digits at most; only forms that survive a round trip can match the same
            # number stored elsewhere (text already in E.164 form has just made that trip)
            if len(e164) <= 16 and (e164 == dialled or self._round_trips(e164)):
                return Address("phone", e164)
            return Address("invalid", text)
        if _INTERNATIONAL.match(dialled):  # a number phonenumbers does not know the length of: someone Apple reached
            return Address("phone", dialled)
        digits = re.sub(r"\D", "", text)
        if _DIGITS.match(text) and not text.startswith("+") and 3 <= len(digits) <= 8:
            return Address("short-code", digits)
        if any(ch.isalpha() for ch in text):
            return Address("sender-id", text)
        return Address("invalid", text)

    def _round_trips(self, e164: str) -> bool:
        again = self._parse_phone(e164, self.region)
        return again is not None and phonenumbers.format_number(again, PhoneNumberFormat.E164) == e164

    def _parse_phone(self, text: str, region: str) -> phonenumbers.PhoneNumber | None:
        if sum(ch.isdigit() for ch in text) < 7:
            return None
        try:
            number = phonenumbers.parse(text, region, keep_raw_input=True)  # keeps where its country code came from
        except phonenumbers.NumberParseException:
            return None
        if phonenumbers.is_possible_number_with_reason(number) != ValidationResult.IS_POSSIBLE:
            return _mexican_today(number)
        return number


def _mexican_today(number: phonenumbers.PhoneNumber) -> phonenumbers.PhoneNumber | None:
    """A Mexican number written with a prefix dropped in 2019, as it is dialled today (else None): `1 415 …`
    at home in Mexico is someone in the US, not `+52 1 415 …`."""
    significant = phonenumbers.national_significant_number(number)
    dropped = _MX_INTERNATIONAL if number.country_code_source in _WITH_COUNTRY_CODE else _MX_NATIONAL
    if number.country_code != 52 or significant[:-10] not in dropped:
        return None
    today = phonenumbers.parse(f"+52{significant[-10:]}")
    return today if phonenumbers.is_possible_number_with_reason(today) == ValidationResult.IS_POSSIBLE else None


def _email(lowered: str) -> Address:
    """An email as typed, or pasted with more around it: `Ann Lee <ann@example.com>`, `Lee, Ann <ann@…>`,
    `ann@example.com,`. A list of several addresses is none of them (a household's card may hold one)."""
    inside = [a.removeprefix("mailto:").rstrip(".") for _name, a in getaddresses([lowered]) if "@" in a]
    if len(inside) == 1 and inside[0] != lowered and _EMAIL.match(found := inside[0]):
        at = lowered.find(found)  # as written there, not put together from pieces around it
        if at == 0 or (at > 0 and lowered[at - 1] in _BEFORE_PASTED_EMAIL):
            return Address("email", found)
    return Address("email", lowered) if _EMAIL.match(lowered) else Address("invalid", lowered)


def crm_takes_email(value: str) -> bool:
    """Whether the CRM stores this email: an address it refuses ("ann@example..com", a non-ASCII one)
    still identifies its person, but is not sent."""
    return _CRM_EMAIL.fullmatch(value) is not None


def display_address(value: str) -> str:
    """How a placeholder shows an address: RFC 3966 without `tel:` for phones, as is otherwise."""
    if value.startswith("+"):
        try:
            number = phonenumbers.parse(value, None)
            return phonenumbers.format_number(number, PhoneNumberFormat.RFC3966).removeprefix("tel:")
        except phonenumbers.NumberParseException:
            return value
    return value


def placeholder_fields(value: str) -> dict[str, str]:
    """CRM fields of the placeholder contact for an address nobody has a card for."""
    fields = {"firstName": PLACEHOLDER_FIRST, "lastName": f"({display_address(value)})", "notes": PLACEHOLDER_NOTE}
    fields["email" if "@" in value else "phone"] = value
    return fields


def is_placeholder(contact: dict) -> bool:
    """Whether a CRM contact looks like a placeholder crm-syncd created."""
    return contact.get("firstName") == PLACEHOLDER_FIRST and PLACEHOLDER_NOTE in (contact.get("notes") or "")


def owner_notes(contact: dict) -> str:
    """A placeholder's notes without crm-syncd's marker: what the owner wrote there."""
    return (contact.get("notes") or "").replace(PLACEHOLDER_NOTE, "").strip()


@dataclass
class Person:
    """One human (or company), merged from every card that describes them."""

    key: str  # stable: the smallest unique id among its cards
    cards: list[Card]
    phones: list[str] = field(default_factory=list)  # E.164, preferred first
    emails: list[str] = field(default_factory=list)  # lower-case, preferred first
    mobiles: set[str] = field(default_factory=set)  # the phones a card of theirs labels mobile
    shared: set[str] = field(default_factory=set)  # addresses other people's cards hold too
    not_owned: set[str] = field(default_factory=set)  # of those, the ones another person owns

    @property
    def addresses(self) -> list[str]:
        return self.phones + self.emails

    @property
    def unique_ids(self) -> set[str]:
        """The unique ids of the person's cards."""
        return {card.unique_id for card in self.cards}

    @property
    def owned(self) -> list[str]:
        """The addresses whose messages and calls are this person's."""
        return [a for a in self.addresses if a not in self.not_owned]

    @property
    def card(self) -> Card:
        """The card that supplies the name, and first of all the organisation, title and note: the one
        Contacts takes a linked person's name from, else the most recently modified one among those with
        the fullest name (first and last, then either, then a nickname or organisation)."""
        return max(self.cards, key=lambda c: (bool(c.link_id and c.preferred_name), bool(_text(c.first)) + bool(_text(c.last)),
                                              bool(_name(c)), c.modified or 0.0, c.store, c.unique_id))

    @property
    def preferred(self) -> list[Card]:
        """The cards in the order their phones, emails and other fields are taken: the naming card, then
        the most recently modified."""
        named_by = self.card
        return sorted(self.cards, key=lambda c: (c is not named_by, -(c.modified or 0.0), c.store, c.unique_id))

    @property
    def nameless(self) -> bool:
        """Whether no card gives a name: the contact is named after an address (or "Unnamed")."""
        return not _name(self.card)

    def crm_fields(self) -> dict[str, str | None]:
        """The CRM contact this person should be, by a deterministic naming rule.

        The CRM demands non-empty first and last names. A company card is named
        "<Organisation> (company)"; a card with only one name part gets "-" for the other;
        a card with no name at all is named after its nickname or first address. Organisation, title
        and note are the naming card's, or, where it has none, the first other card's that has one
        (a sparse copy of a card in another account hides nothing).
        """
        card, preferred = self.card, self.preferred
        first, last = _text(card.first), _text(card.last)
        organization = _first_text(preferred, "organization") or None
        if (card.company or not (first or last)) and organization:
            first, last = organization, COMPANY_LAST
        elif not (first or last):
            first = _text(card.nickname) or (self.addresses[0] if self.addresses else "Unnamed")
        notes = _first_text(preferred, "note")
        return {
            "firstName": first or MISSING_NAME,
            "lastName": last or MISSING_NAME,
            "phone": self.phones[0] if self.phones else None,
            "email": next((e for e in self.emails if crm_takes_email(e)), None),
            "organization": organization,
            "title": _first_text(preferred, "job_title") or None,
            "notes": (notes[:NOTES_MAX_CHARS - 1] + "…" if len(notes) > NOTES_MAX_CHARS else notes) or None,
        }


def _text(value: str | None) -> str:
    """A card's text as the CRM can store it: trimmed, without NUL characters (PostgreSQL refuses them)."""
    return (value or "").replace("\x00", "").strip()


def _first_text(cards: list[Card], attribute: str) -> str:
    """A card field, from the first of the cards that has it ("" if none does)."""
    return next((text for card in cards if (text := _text(getattr(card, attribute)))), "")


def merge_cards(cards: Iterable[Card], normalize: Normalizer) -> list[Person]:
    """Group cards describing the same person.

    Contacts' own links join cards always (same unique id, same link id). A shared phone or email joins
    them when their names agree (one's words all in the other's) or one card has none, unless that card
    meets several people who do not agree (`_bridges`); or when it is one person's mobile in several
    accounts (`_one_mobile`). So people who share an address (a home line, an office's main number, a
    family email) stay apart, as Contacts shows them, and the address is `owned` by one of them (see
    `_share`). The grouping depends on the cards only, not on their order.
    """
    cards = sorted(cards, key=lambda c: (c.unique_id, c.store))
    parent = list(range(len(cards)))
    own = [_name(card) for card in cards]
    names = {i: {name} - {""} for i, name in enumerate(own)}  # the names of each root's group

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int, *, if_named_alike: bool = False) -> bool:
        a, b = root(i), root(j)
        if a != b:
            if if_named_alike and not _alike(names[a], names[b]):
                return False
            parent[a] = b
            names[b] |= names.pop(a)
        return True

    first_with: dict[str, int] = {}
    holders: dict[str, list[tuple[int, bool]]] = {}  # address -> (card, a mobile number on it)
    addresses = [_card_addresses(card, normalize) for card in cards]
    for i, card in enumerate(cards):
        for token in [f"id:{card.unique_id}"] + ([f"link:{card.link_id}"] if card.link_id else []):
            join(i, first_with.setdefault(token, i))
        for address, mobile in addresses[i].items():
            holders.setdefault(address, []).append((i, mobile))
    apart = _bridges(own, holders)
    for address in sorted(holders):
        held_by = holders[address]
        earlier: list[int] = []
        unnamed: list[int] = []
        named = _NameIndex()
        for i, _ in held_by:
            if i in apart:
                continue
            if earlier:  # only the cards its name may agree with: a number on many cards stays cheap
                tries = unnamed + named.agreeing(own[i]) if own[i] else earlier[:1]
                for j in tries:
                    if join(i, j, if_named_alike=True):
                        break
            earlier.append(i)
            if own[i]:
                named.add(i, own[i])
            else:
                unnamed.append(i)
    for address in sorted(holders):  # after the names: one person in several accounts, under two spellings
        if _one_mobile(cards, addresses, holders[address]):
            for i, _ in holders[address][1:]:
                join(i, holders[address][0][0])

    groups: dict[int, list[Card]] = {}
    for i, card in enumerate(cards):
        groups.setdefault(root(i), []).append(card)
    people = [_person(group, normalize) for group in groups.values()]
    _share(people)
    return people


def _one_mobile(cards: list[Card], addresses: list[dict[str, bool]], held_by: list[tuple[int, bool]]) -> bool:
    """Whether an address is a mobile number on every card that holds it, each in another account, all
    under one last name, and at most one of them with other numbers or emails ("Robert Roe" in iCloud,
    "Bob Roe" with his email in Google): one person's phone. (A number typed on an iPhone is a mobile
    by default, so a shared home line may be labelled so too: within one account, across last names,
    or between cards that each have addresses of their own, that is no sign.)"""
    if len(held_by) < 2 or not all(mobile for _, mobile in held_by):
        return False
    stores = [cards[i].store for i, _ in held_by]
    lasts = {_text(cards[i].last).casefold() for i, _ in held_by}
    with_others = sum(len(addresses[i]) > 1 for i, _ in held_by)
    return len(set(stores)) == len(stores) and len(lasts) == 1 and "" not in lasts and with_others <= 1


def _name(card: Card) -> str:
    """The name a card gives its person, to tell people apart: first and last, else the organisation,
    else the nickname; case and spacing aside ("" for a card with none)."""
    first_last = " ".join(filter(None, (_text(card.first), _text(card.last))))
    text = first_last if first_last and not card.company else (_text(card.organization) or first_last
                                                                or _text(card.nickname))
    return " ".join(text.casefold().split())


def _alike(names: set[str], others: set[str]) -> bool:
    """Whether two groups' names may be one person's: every name of one and every name of the other
    agree, one's words all in the other's ("Jane" and "Jane Doe"); a group with no name agrees."""
    return all(_agree(a, b) for a in names for b in others)


def _agree(name: str, other: str) -> bool:
    words, others = set(name.split()), set(other.split())
    return words <= others or others <= words


def _bridges(own: list[str], holders: dict[str, list[tuple[int, bool]]]) -> set[int]:
    """Cards that share addresses with several people whose names do not agree with each other, though
    each agrees with the card's: a nameless card, or a household's "Smith" beside Alice and Bob Smith.
    They join no one by address."""
    met: dict[int, set[str]] = {}
    apart: set[int] = set()
    for held_by in holders.values():
        named = _NameIndex()
        for i, _ in held_by:
            if own[i]:
                named.add(i, own[i])
        everyone = {own[j] for j in named.cards}
        agreed = _chain(everyone)  # else every nameless card here is a bridge, whatever else it meets
        for i, _ in held_by:
            if own[i]:
                met.setdefault(i, set()).update(own[j] for j in named.agreeing(own[i]) if j != i)
            elif agreed:
                met.setdefault(i, set()).update(everyone)
            else:
                apart.add(i)
    return apart | {i for i, names in met.items() if names and not _chain(names | ({own[i]} - {""}))}


class _NameIndex:
    """Cards by name, to find those whose names agree with one without comparing every pair."""

    MAX_WORDS = 4  # a longer name finds the names made of up to this many of its words, or all but one or two

    def __init__(self) -> None:
        self.cards: list[int] = []
        self._words: dict[int, frozenset[str]] = {}
        self._by_words: dict[frozenset[str], list[int]] = {}
        self._by_word: dict[str, list[int]] = {}

    def add(self, card: int, name: str) -> None:
        words = frozenset(name.split())
        self.cards.append(card)
        self._words[card] = words
        self._by_words.setdefault(words, []).append(card)
        for word in words:
            self._by_word.setdefault(word, []).append(card)

    def agreeing(self, name: str) -> list[int]:
        """The cards, in the order added, whose names' words all lie in `name`'s (see MAX_WORDS), or hold
        all of them."""
        words = frozenset(name.split())
        sizes = set(range(1, min(len(words), self.MAX_WORDS) + 1)) | {len(words) - 2, len(words) - 1} - {-1, 0}
        parts = (frozenset(c) for n in sorted(sizes) for c in combinations(sorted(words), n))
        found = {card for part in parts for card in self._by_words.get(part, ())}
        fewest = min((self._by_word.get(w, []) for w in words), key=len, default=[])
        found.update(card for card in fewest if words <= self._words[card])
        return sorted(found)


def _chain(names: set[str]) -> bool:
    """Whether every two of the names agree: by word count, each one's words are in the next one's."""
    ordered = sorted((set(n.split()) for n in names), key=len)
    return all(a <= b for a, b in zip(ordered, ordered[1:]))


def _card_addresses(card: Card, normalize: Normalizer) -> dict[str, bool]:
    """The card's normalised addresses, each with whether it is a mobile number there."""
    found: dict[str, bool] = {}
    for phone in card.phones:
        if address := normalize.person(phone.value, phone.country):
            found[address] = found.get(address, False) or _is_mobile(phone)
    for email in card.emails:
        if address := normalize.person(email.value):
            found.setdefault(address, False)
    return found


def _share(people: list[Person]) -> None:
    """Give each address several people hold one owner: someone whose mobile it is, else a company
    (an office's main number), else the person it ranks first for, else the smallest key."""
    holders: dict[str, list[Person]] = {}
    for person in people:
        for address in person.addresses:
            holders.setdefault(address, []).append(person)
    for address, held_by in holders.items():
        if len(held_by) > 1:
            owner = min(held_by, key=lambda p: (address not in p.mobiles, not p.card.company,
                                                _rank(p, address), p.key))
            for person in held_by:
                person.shared.add(address)
                if person is not owner:
                    person.not_owned.add(address)


def _is_mobile(phone: Phone) -> bool:
    return (phone.label or "").lower() in _MOBILE_LABELS


def _rank(person: Person, address: str) -> int:
    """Where `address` stands among the person's phones or emails (0: their primary or mobile)."""
    return (person.emails if "@" in address else person.phones).index(address)


def _person(cards: list[Card], normalize: Normalizer) -> Person:
    person = Person(key=min(c.unique_id for c in cards), cards=cards)
    preferred = person.preferred  # the naming card's numbers first: the contact gets the name and number of one card
    phones = [p for c in preferred for p in sorted(c.phones, key=_phone_rank)]
    for phone in phones:
        value = normalize(phone.value, phone.country)
        if value.kind == "phone":
            if value.value not in person.phones:
                person.phones.append(value.value)
            if _is_mobile(phone):
                person.mobiles.add(value.value)
    for value in (normalize(e.value) for c in preferred for e in c.emails):
        if value.kind == "email" and value.value not in person.emails:
            person.emails.append(value.value)
    return person


def _phone_rank(phone: Phone) -> tuple[int, int]:
    """Primary first, then mobile numbers, then the card's own order (sort is stable)."""
    return (0 if phone.primary else 1, 0 if _is_mobile(phone) else 1)


def crm_addresses(contact: dict, normalize: Normalizer) -> list[str]:
    """The normalised phone and email a CRM contact carries."""
    return [a for a in (normalize.person(contact.get("phone")), normalize.person(contact.get("email"))) if a]
