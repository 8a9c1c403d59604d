"""Which user a message is about: the one place for the rules of both pipelines.

**Platform messages** (``notifications/``) are keyed by ``user.id``; a message without one is
found by ``external_id``, else by ``email``, and creates a user ``external_id:<value>`` or
``email:<value>`` (:func:`find_users`, :func:`resolve_messages`, :func:`new_user_id`). A chunk
of messages is resolved with one query, in order, as if its messages came one at a time.

**Inbound webhooks** (``inbound/``) carry a customer id, an email and Customer.io's ``cio_id``.
A batch of identities is resolved set-based: the candidate users are loaded with one query per
lookup kind for the whole batch, then each identity is resolved in order in memory, with the
same precedence as one query at a time would give, and users created or learnt earlier in the
batch visible to the later identities:

1. the customer id, against the id the outbound sync sent (``users.cio_id``), then against
   ``user_id_mapping`` (``external_id``, ``email`` case-insensitively, ``id`` or an attribute);
2. the email, case-insensitively, taking only a user whose customer id is unknown or the
   identity's (:meth:`BatchResolver.may_take_by_email`): two customers sharing an address stay
   two users. A user's customer id is known when it has ``users.cio_id`` or a value of
   ``user_id_mapping`` (under the ``email`` and ``id`` mappings, every user with an email or
   an id has one);
3. Customer.io's ``cio_id`` (``users.cio_ref``);

the oldest user (``created_at``, then ``id``) winning a tie. Failing all, a user
``cio:<key>`` is created (or, if one with that id exists already, taken), with ``sync_status``
``inbound`` and the webhook's customer id in ``users.cio_id``. A user found learns the
``cio_id`` and the email when it has none.

**Merging** (:func:`webhook_users_to_merge`, :class:`WebhookUserMerge`): when the platform
sends a user that is new by ``user.id``, the users created from webhooks (``cio:`` and still
``inbound``, i.e. never given platform data) that are the same person are merged into it: those
whose customer id is the platform user's customer id (what the outbound sync will send: the
``user_id_mapping`` attribute), and those without a customer id whose email is its email
(case-insensitively). Their tracked events move to the platform user, which keeps the first
one's ``cio_id`` (``cio_ref``), and they are deleted. A webhook user claimed by several
platform users of one batch goes to the first.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, case, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.models import TrackedEvent, User
from connector.db.sync_state import SyncStatus, webhook_user_state
from connector.db.types import utcnow
from connector.db.upsert import insert
from connector.inbound.mapping import Identity
from connector.notifications.parse import UserMessage
from connector.outbound.mapping import customer_id as outbound_customer_id
from connector.outbound.operations import UserSnapshot

USERS = User.__table__
TRACKED = TrackedEvent.__table__
# Users created from webhooks: their ids begin so, and they keep this status until the platform
# sends them (or they are merged into a user it sends).
WEBHOOK_USER_PREFIX = "cio:"
WEBHOOK_USER_STATUS = SyncStatus.INBOUND
# What resolution needs of a user; loaded for every candidate (with its mapped customer id).
_COLUMNS = (USERS.c.id, USERS.c.created_at, USERS.c.email, USERS.c.cio_id, USERS.c.cio_ref)


def mapping_expression(user_id_mapping: str, dialect: str) -> Any:
    """The users' value that the outbound sync sends as the customer id (see
    :func:`mapping_key`)."""
    if user_id_mapping == "external_id":
        return USERS.c.external_id
    if user_id_mapping == "email":
        return func.lower(USERS.c.email)
    if user_id_mapping == "id":
        return USERS.c.id
    attribute = User.attributes[user_id_mapping].as_string()
    if dialect != "sqlite":
        return attribute
    # SQLite's JSON functions fail the whole query on one row they cannot read (text stored by
    # an earlier version, with NaN in it, say): such a row simply has no value here.
    return case((func.json_valid(USERS.c.attributes) == 1, attribute), else_=None)


def mapping_key(customer_id: str, user_id_mapping: str) -> str:
    """What :func:`mapping_expression` equals for the users of ``customer_id``."""
    return customer_id.lower() if user_id_mapping == "email" else customer_id


def candidate_id(identity: Identity) -> str:
    """The id of the user created for ``identity`` (which must not be empty)."""
    return f"{WEBHOOK_USER_PREFIX}{identity.customer_id or identity.email or identity.cio_id}"


def new_user_row(identity: Identity, user_id_mapping: str, now: datetime) -> dict[str, Any]:
    """The ``users`` row created for ``identity`` when no user matches it."""
    attributes: dict[str, Any] = {}
    if identity.email:
        attributes["email"] = identity.email
    if identity.customer_id and user_id_mapping not in ("id", "email"):
        attributes[user_id_mapping] = identity.customer_id
    return {
        "id": candidate_id(identity),
        "external_id": identity.customer_id if user_id_mapping == "external_id" else None,
        "email": identity.email,
        "attributes": attributes,
        "anonymous_ids": [],
        "account": {},
        "segments": [],
        "cio_id": identity.customer_id,
        "cio_ref": identity.cio_id,
        **webhook_user_state(),
        "created_at": now,
        "updated_at": now,
    }


@dataclass(eq=False)
class _User:
    id: str
    rank: tuple[Any, ...]
    """Oldest first, as the lookups order users: ``(created_at, 0, id)`` for stored users,
    ``(created_at, 1, n)`` for the n-th user created by this batch."""
    email: str | None
    cio_ref: str | None
    cio_id: str | None
    """The customer id the outbound sync sent, or the webhook that created it carried."""
    mapped: str | None
    """Its value of ``user_id_mapping`` (as :func:`mapping_key` gives it)."""
    row: dict[str, Any] | None = None
    """The row to insert, for a user created by this batch."""
    learnt: dict[str, str] = field(default_factory=dict)
    """Columns learnt by a stored user: ``cio_ref`` and/or ``email``."""


class _Index:
    """The oldest user for each value of one lookup."""

    def __init__(self) -> None:
        self.users: dict[Any, _User] = {}

    def add(self, key: Any, user: _User) -> None:
        if key is None:
            return
        current = self.users.get(key)
        if current is None or user.rank < current.rank:
            self.users[key] = user

    def get(self, key: Any) -> _User | None:
        return self.users.get(key)


class _MultiIndex:
    """Every user for each value of one lookup, oldest first."""

    def __init__(self) -> None:
        self.users: dict[Any, list[_User]] = {}

    def add(self, key: Any, user: _User) -> None:
        if key is None:
            return
        users = self.users.setdefault(key, [])
        if user not in users:
            users.append(user)
            users.sort(key=lambda u: u.rank)

    def get(self, key: Any) -> list[_User]:
        return self.users.get(key, [])


class BatchResolver:
    """Resolves the identities of one batch in order (see the module's docstring)."""

    def __init__(self, user_id_mapping: str, now: datetime):
        self._mapping = user_id_mapping
        self._now = now
        self._known: dict[str, _User] = {}
        self._created = itertools.count()
        self.by_cio_id = _Index()
        self.by_mapping = _Index()
        self.by_email = _MultiIndex()
        self.by_cio_ref = _Index()
        self.by_id: dict[str, _User] = {}

    # -- loading ---------------------------------------------------------------------------

    def stored(self, row: Any) -> _User:
        """The one :class:`_User` of a row loaded from the database."""
        user = self._known.get(row.id)
        if user is None:
            user = _User(
                id=row.id,
                rank=(row.created_at, 0, row.id),
                email=row.email,
                cio_ref=row.cio_ref,
                cio_id=row.cio_id,
                mapped=row.mapped,
            )
            self._known[row.id] = user
        return user

    def _found_stored(self, identity: Identity) -> bool:
        """Whether the users loaded so far resolve ``identity`` (which stays so: lookups only
        ever gain users)."""
        return self.find(identity) is not None

    async def load(self, session: AsyncSession, identities: Sequence[Identity]) -> None:
        """Load every stored user that can matter to ``identities``: one query per lookup,
        each only for the identities the lookups before it left unresolved."""
        self._mapped = mapping_expression(self._mapping, session.bind.dialect.name).label("mapped")
        customer_ids = {i.customer_id for i in identities if i.customer_id}
        await self._load(session, self.by_cio_id, USERS.c.cio_id, customer_ids)
        pending = [i for i in identities if not self._found_stored(i)]
        mapping_keys = {mapping_key(i.customer_id, self._mapping) for i in pending if i.customer_id}
        await self._load(session, self.by_mapping, self._mapped.element, mapping_keys)
        pending = [i for i in pending if not self._found_stored(i)]
        emails = {i.email.lower() for i in pending if i.email}
        await self._load(session, self.by_email, func.lower(USERS.c.email), emails)
        pending = [i for i in pending if not self._found_stored(i)]
        cio_ids = {i.cio_id for i in pending if i.cio_id}
        await self._load(session, self.by_cio_ref, USERS.c.cio_ref, cio_ids)
        pending = [i for i in pending if not self._found_stored(i)]
        if pending:
            ids = {candidate_id(i) for i in pending}
            rows = await session.execute(select(*_COLUMNS, self._mapped).where(USERS.c.id.in_(ids)))
            for row in rows:
                self.by_id[row.id] = self.stored(row)

    async def _load(
        self, session: AsyncSession, index: _Index | _MultiIndex, expression: Any, keys: set[str]
    ) -> None:
        if not keys:
            return
        query = (
            select(*_COLUMNS, self._mapped, expression.label("lookup_key"))
            .where(expression.in_(keys))
            .order_by(USERS.c.created_at, USERS.c.id)
        )
        for row in await session.execute(query):
            user = self.stored(row)
            if isinstance(index, _MultiIndex):
                index.add(row.lookup_key, user)
            # Rows come oldest first: the first of each key is the one a lookup takes.
            elif row.lookup_key not in index.users:
                index.users[row.lookup_key] = user

    # -- resolving -------------------------------------------------------------------------

    def find(self, identity: Identity) -> _User | None:
        """By customer id (what was sent as the id, else the mapped attribute), then email,
        then Customer.io's ``cio_id``."""
        if identity.customer_id:
            user = self.by_cio_id.get(identity.customer_id) or self.by_mapping.get(
                mapping_key(identity.customer_id, self._mapping)
            )
            if user is not None:
                return user
        if identity.email:
            for user in self.by_email.get(identity.email.lower()):
                if self.may_take_by_email(user, identity):
                    return user
        if identity.cio_id:
            return self.by_cio_ref.get(identity.cio_id)
        return None

    def may_take_by_email(self, user: _User, identity: Identity) -> bool:
        """Whether ``identity`` may be attached to ``user`` by its email: only if the user's
        customer id is unknown or the identity's (SPEC §6)."""
        if not identity.customer_id:
            return True
        key = mapping_key(identity.customer_id, self._mapping)
        return user.cio_id in (None, identity.customer_id) and user.mapped in (None, key)

    def resolve(self, identity: Identity) -> _User:
        """The user of ``identity`` (which must not be empty), created if none matches, and
        learning its ``cio_id`` and email on the way."""
        user = self.find(identity)
        if user is None:
            user = self.by_id.get(candidate_id(identity))
            if user is None:
                return self._create(identity)
        self._learn(user, identity)
        return user

    def _create(self, identity: Identity) -> _User:
        # A microsecond apart, so that the database orders them as they were created.
        number = next(self._created)
        created_at = self._now + timedelta(microseconds=number)
        row = new_user_row(identity, self._mapping, created_at)
        if self._mapping == "external_id":
            mapped = row["external_id"]
        elif self._mapping == "id":
            mapped = row["id"]
        elif self._mapping == "email":
            mapped = None  # set by _index_email
        else:
            mapped = row["attributes"].get(self._mapping)
        user = _User(
            id=row["id"],
            rank=(created_at, 1, number),
            email=row["email"],
            cio_ref=row["cio_ref"],
            cio_id=row["cio_id"],
            mapped=mapped,
            row=row,
        )
        self.by_id[user.id] = user
        self.by_cio_id.add(row["cio_id"], user)
        if self._mapping != "email":
            self.by_mapping.add(mapped, user)
        self._index_email(user)
        self.by_cio_ref.add(user.cio_ref, user)
        return user

    def _index_email(self, user: _User) -> None:
        if user.email is None:
            return
        # Inbound emails are ASCII (see mapping.parse_email), so Python's lower() is SQL's.
        self.by_email.add(user.email.lower(), user)
        if self._mapping == "email":
            user.mapped = user.email.lower()
            self.by_mapping.add(user.mapped, user)

    def _learn(self, user: _User, identity: Identity) -> None:
        if identity.cio_id and not user.cio_ref:
            user.cio_ref = identity.cio_id
            self._changed(user, "cio_ref", identity.cio_id)
            self.by_cio_ref.add(user.cio_ref, user)
        if identity.email and not user.email:
            user.email = identity.email
            self._changed(user, "email", identity.email)
            self._index_email(user)

    @staticmethod
    def _changed(user: _User, column: str, value: str) -> None:
        if user.row is not None:
            user.row[column] = value
        else:
            user.learnt[column] = value

    # -- writing ---------------------------------------------------------------------------

    async def write(self, session: AsyncSession) -> None:
        """Insert the users created and store what stored users learnt: one INSERT and at most
        one (executemany) UPDATE."""
        created = sorted((u for u in self.by_id.values() if u.row is not None), key=lambda u: u.id)
        if created:
            result = await session.execute(
                insert(session, USERS)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(USERS.c.id),
                [u.row for u in created],
            )
            inserted = {row[0] for row in result}
            lost = {u.id: u for u in created if u.id not in inserted}
            if lost:
                # Another instance created the same users a moment ago: take theirs, and let
                # them learn what these would have brought.
                rows = await session.execute(
                    select(*_COLUMNS, self._mapped).where(USERS.c.id.in_(lost))
                )
                for row in rows:
                    mine = lost[row.id]
                    assert mine.row is not None
                    for column in ("cio_ref", "email"):
                        if mine.row[column] and not getattr(row, column):
                            mine.learnt[column] = mine.row[column]
                    mine.row = None
        learnt = sorted((u for u in self._all() if u.learnt), key=lambda u: u.id)
        if learnt:
            await session.execute(
                update(USERS)
                .where(USERS.c.id == bindparam("b_id"))
                .values(
                    cio_ref=func.coalesce(bindparam("b_cio_ref", type_=String), USERS.c.cio_ref),
                    email=func.coalesce(bindparam("b_email", type_=String), USERS.c.email),
                ),
                [
                    {
                        "b_id": u.id,
                        "b_cio_ref": u.learnt.get("cio_ref"),
                        "b_email": u.learnt.get("email"),
                    }
                    for u in learnt
                ],
            )

    def _all(self) -> Iterable[_User]:
        yield from self._known.values()
        yield from (u for u in self.by_id.values() if u.id not in self._known)


async def resolve_users(
    session: AsyncSession, identities: Sequence[Identity], user_id_mapping: str
) -> list[str]:
    """The user id of each identity (none may be empty), in order; creates the missing users
    and stores what the found ones learnt, in ``session``'s transaction."""
    if not identities:
        return []
    resolver = BatchResolver(user_id_mapping, utcnow())
    await resolver.load(session, identities)
    ids = [resolver.resolve(identity).id for identity in identities]
    await resolver.write(session)
    return ids


# -- the platform's users --------------------------------------------------------------------


def new_user_id(message: UserMessage) -> str:
    """The id of the user created for a platform message that matches no stored user."""
    if message.key:
        return message.key
    if message.external_id:
        return f"external_id:{message.external_id}"
    return f"email:{message.email}"


@dataclass(frozen=True)
class StoredUser:
    """What storing a platform message needs of a stored user."""

    id: str
    external_id: str | None
    email: str | None
    data_hash: str | None


async def find_users(session: AsyncSession, messages: Sequence[UserMessage]) -> list[StoredUser]:
    """The stored users that ``messages`` can be about (by ``user.id``; without it by
    ``external_id``, else by ``email``), oldest first, locked for the rest of the transaction:
    one query."""
    keys = {m.key for m in messages if m.key}
    external_ids = {m.external_id for m in messages if not m.key and m.external_id}
    emails = {m.email for m in messages if not m.key and not m.external_id and m.email}
    conditions = []
    if keys:
        conditions.append(USERS.c.id.in_(keys))
    if external_ids:
        conditions.append(USERS.c.external_id.in_(external_ids))
    if emails:
        conditions.append(USERS.c.email.in_(emails))
    if not conditions:
        return []
    query = (
        select(USERS.c.id, USERS.c.external_id, USERS.c.email, USERS.c.data_hash)
        .where(or_(*conditions))
        .order_by(USERS.c.created_at, USERS.c.id)
        .with_for_update()
    )
    return [StoredUser(*row) for row in await session.execute(query)]


class _PlatformUsers:
    """The users a chunk of messages can be about, oldest first, with the ``external_id`` and
    ``email`` the messages before have given them."""

    def __init__(self, stored: Iterable[StoredUser]):
        self._rank: dict[str, int] = {}
        self._values: dict[str, tuple[str | None, str | None]] = {}
        self._by_external_id: dict[str, set[str]] = {}
        self._by_email: dict[str, set[str]] = {}
        for user in stored:
            self.set(user.id, user.external_id, user.email)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._rank

    def set(self, user_id: str, external_id: str | None, email: str | None) -> None:
        old = self._values.get(user_id)
        if old == (external_id, email):
            return
        self._rank.setdefault(user_id, len(self._rank))
        if old is not None:
            self._by_external_id.get(old[0] or "", set()).discard(user_id)
            self._by_email.get(old[1] or "", set()).discard(user_id)
        self._values[user_id] = (external_id, email)
        if external_id:
            self._by_external_id.setdefault(external_id, set()).add(user_id)
        if email:
            self._by_email.setdefault(email, set()).add(user_id)

    def find(self, message: UserMessage) -> str | None:
        if message.key:
            return message.key if message.key in self else None
        if message.external_id:
            candidates = self._by_external_id.get(message.external_id)
        else:
            candidates = self._by_email.get(message.email or "")
        return min(candidates, key=self._rank.__getitem__) if candidates else None


def resolve_messages(messages: Sequence[UserMessage], stored: Iterable[StoredUser]) -> list[str]:
    """The id of each message's user, in order, as if the messages were stored one at a time:
    the user ``user.id`` names; without one, the oldest user whose ``external_id`` is the
    message's, else (without ``external_id``) whose ``email`` is (case-sensitively); failing
    that, a new user :func:`new_user_id`. A message's user takes its ``external_id`` and
    ``email`` for the messages after it.

    ``stored`` is what :func:`find_users` loaded for ``messages`` (oldest first).
    """
    users = _PlatformUsers(stored)
    ids = []
    for message in messages:
        user_id = users.find(message) or new_user_id(message)
        users.set(user_id, message.external_id, message.email)
        ids.append(user_id)
    return ids


# -- merging the users created from webhooks into the platform's -----------------------------


@dataclass(frozen=True)
class PlatformUser:
    """A user the platform sends for the first time, as the merge sees it."""

    id: str
    customer_id: str | None
    """What the outbound sync will send as its customer id (``user_id_mapping``)."""
    email: str | None


@dataclass(frozen=True)
class WebhookUser:
    """A user created from webhooks and never sent by the platform."""

    id: str
    customer_id: str | None
    """The customer id its webhooks carried (``users.cio_id``)."""
    email: str | None
    cio_ref: str | None


def platform_user(message: UserMessage, user_id_mapping: str) -> PlatformUser:
    """The platform user of a message with a ``user.id``."""
    assert message.key is not None
    snapshot = UserSnapshot(
        id=message.key,
        external_id=message.external_id,
        email=message.email,
        anonymous_ids=(),
        attributes=message.attributes,
        account={},
        segments=(),
    )
    return PlatformUser(
        id=message.key,
        customer_id=outbound_customer_id(snapshot, user_id_mapping),
        email=message.email,
    )


def webhook_users_to_merge(
    platform: Sequence[PlatformUser], webhook: Sequence[WebhookUser], user_id_mapping: str
) -> dict[str, list[WebhookUser]]:
    """The webhook users each platform user takes over (see the module's docstring), by
    platform user id; platform users taking none are left out.

    ``platform`` is in the order the messages came, ``webhook`` oldest first (that order is
    kept in each list).
    """
    by_customer_id: dict[str, list[WebhookUser]] = {}
    by_email: dict[str, list[WebhookUser]] = {}
    for user in webhook:
        if user.customer_id:
            key = mapping_key(user.customer_id, user_id_mapping)
            by_customer_id.setdefault(key, []).append(user)
        elif user.email:
            by_email.setdefault(user.email.lower(), []).append(user)
    order = {user.id: position for position, user in enumerate(webhook)}
    taken: set[str] = set()
    merges: dict[str, list[WebhookUser]] = {}
    for user in platform:
        claimed = []
        if user.customer_id:
            claimed += by_customer_id.get(mapping_key(user.customer_id, user_id_mapping), [])
        if user.email:
            claimed += by_email.get(user.email.lower(), [])
        mine = [w for w in claimed if w.id not in taken]
        if mine:
            taken.update(w.id for w in mine)
            merges[user.id] = sorted(mine, key=lambda w: order[w.id])
    return merges


class WebhookUserMerge:
    """The merges of one chunk of platform messages, in the transaction that stores them:
    :meth:`load` before the new users are created (which take :meth:`cio_ref_for`), then
    :meth:`apply` once they are flushed."""

    def __init__(self) -> None:
        self.merges: dict[str, list[WebhookUser]] = {}

    async def load(
        self,
        session: AsyncSession,
        platform: Sequence[PlatformUser],
        user_id_mapping: str,
        exclude: Iterable[str] = (),
    ) -> None:
        """Find (with one query) and lock the webhook users that ``platform``, the chunk's
        users new by id, take over; the users in ``exclude`` (those the chunk's messages
        update) are not taken."""
        customer_ids = {
            mapping_key(u.customer_id, user_id_mapping) for u in platform if u.customer_id
        }
        emails = {u.email.lower() for u in platform if u.email}
        if not customer_ids and not emails:
            return
        customer_id = USERS.c.cio_id
        if user_id_mapping == "email":
            customer_id = func.lower(customer_id)
        # `cio_id || ''` rather than `cio_id`: SQLite's planner, which has no statistics, would
        # otherwise find the users without a customer id through ix_users_cio_id (every
        # platform user not sent yet) and not through the emails' index.
        no_customer_id = (USERS.c.cio_id + "").is_(None)
        query = (
            select(USERS.c.id, USERS.c.cio_id, USERS.c.email, USERS.c.cio_ref)
            .where(
                USERS.c.id.startswith(WEBHOOK_USER_PREFIX),
                USERS.c.sync_status == WEBHOOK_USER_STATUS,
                or_(
                    customer_id.in_(customer_ids),
                    no_customer_id & func.lower(USERS.c.email).in_(emails),
                ),
            )
            .order_by(USERS.c.created_at, USERS.c.id)
            # Webhooks for these users, processed meanwhile, wait for the merge and then find
            # the platform user; without the lock their events could be deleted with the user.
            .with_for_update()
        )
        excluded = set(exclude)
        webhook = [
            WebhookUser(id=row.id, customer_id=row.cio_id, email=row.email, cio_ref=row.cio_ref)
            for row in await session.execute(query)
            if row.id not in excluded
        ]
        self.merges = webhook_users_to_merge(platform, webhook, user_id_mapping)

    def cio_ref_for(self, user_id: str) -> str | None:
        """The ``cio_ref`` the new platform user ``user_id`` keeps from its webhook users."""
        return next((w.cio_ref for w in self.merges.get(user_id, ()) if w.cio_ref), None)

    async def apply(self, session: AsyncSession) -> None:
        """Move the webhook users' tracked events to the platform users and delete them: one
        (executemany) UPDATE and one DELETE."""
        moves = [
            {"b_from": w.id, "b_to": user_id}
            for user_id, webhook in self.merges.items()
            for w in webhook
        ]
        if not moves:
            return
        await session.execute(
            update(TRACKED)
            .where(TRACKED.c.user_id == bindparam("b_from"))
            .values(user_id=bindparam("b_to")),
            moves,
        )
        await session.execute(delete(USERS).where(USERS.c.id.in_([m["b_from"] for m in moves])))
