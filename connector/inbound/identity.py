"""Finding the users inbound events are about, or creating them with what is known.

A batch of identities is resolved set-based: the candidate users are loaded with one query per
lookup kind for the whole batch, then each identity is resolved in order in memory, with the
same precedence as one query at a time would give, and users created or learnt earlier in the
batch visible to the later identities:

1. the customer id, against the id the outbound sync sent (``users.cio_id``), then against
   ``user_id_mapping`` (``external_id``, ``email`` case-insensitively, ``id`` or an attribute);
2. the email, case-insensitively;
3. Customer.io's ``cio_id`` (``users.cio_ref``);

the oldest user (``created_at``, then ``id``) winning a tie. Failing all, a user
``cio:<key>`` is created (or, if one with that id exists already, taken). A user found learns
the ``cio_id`` and the email when it has none.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.models import User
from connector.db.sync_state import SyncStatus
from connector.db.types import utcnow
from connector.db.upsert import insert
from connector.inbound.mapping import Identity

USERS = User.__table__
# What resolution needs of a user; loaded for every candidate.
_COLUMNS = (USERS.c.id, USERS.c.created_at, USERS.c.email, USERS.c.cio_ref)


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
    return f"cio:{identity.customer_id or identity.email or identity.cio_id}"


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
        "sync_status": SyncStatus.INBOUND,
        "version": 0,
        "pending": False,
        "attempts": 0,
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


class BatchResolver:
    """Resolves the identities of one batch in order (see the module's docstring)."""

    def __init__(self, user_id_mapping: str, now: datetime):
        self._mapping = user_id_mapping
        self._now = now
        self._known: dict[str, _User] = {}
        self._created = itertools.count()
        self.by_cio_id = _Index()
        self.by_mapping = _Index()
        self.by_email = _Index()
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
        customer_ids = {i.customer_id for i in identities if i.customer_id}
        await self._load(session, self.by_cio_id, USERS.c.cio_id, customer_ids)
        pending = [i for i in identities if not self._found_stored(i)]
        mapping_keys = {mapping_key(i.customer_id, self._mapping) for i in pending if i.customer_id}
        await self._load(
            session,
            self.by_mapping,
            mapping_expression(self._mapping, session.bind.dialect.name),
            mapping_keys,
        )
        pending = [i for i in pending if not self._found_stored(i)]
        emails = {i.email.lower() for i in pending if i.email}
        await self._load(session, self.by_email, func.lower(USERS.c.email), emails)
        pending = [i for i in pending if not self._found_stored(i)]
        cio_ids = {i.cio_id for i in pending if i.cio_id}
        await self._load(session, self.by_cio_ref, USERS.c.cio_ref, cio_ids)
        pending = [i for i in pending if not self._found_stored(i)]
        if pending:
            ids = {candidate_id(i) for i in pending}
            rows = await session.execute(select(*_COLUMNS).where(USERS.c.id.in_(ids)))
            for row in rows:
                self.by_id[row.id] = self.stored(row)

    async def _load(
        self, session: AsyncSession, index: _Index, expression: Any, keys: set[str]
    ) -> None:
        if not keys:
            return
        query = (
            select(*_COLUMNS, expression.label("lookup_key"))
            .where(expression.in_(keys))
            .order_by(USERS.c.created_at, USERS.c.id)
        )
        for row in await session.execute(query):
            user = self.stored(row)
            # Rows come oldest first: the first of each key is the one a lookup takes.
            if row.lookup_key not in index.users:
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
            user = self.by_email.get(identity.email.lower())
            if user is not None:
                return user
        if identity.cio_id:
            return self.by_cio_ref.get(identity.cio_id)
        return None

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
        user = _User(
            id=row["id"],
            rank=(created_at, 1, number),
            email=row["email"],
            cio_ref=row["cio_ref"],
            row=row,
        )
        self.by_id[user.id] = user
        self.by_cio_id.add(row["cio_id"], user)
        if self._mapping == "external_id":
            self.by_mapping.add(row["external_id"], user)
        elif self._mapping == "id":
            self.by_mapping.add(user.id, user)
        elif self._mapping != "email":
            self.by_mapping.add(row["attributes"].get(self._mapping), user)
        self._index_email(user)
        self.by_cio_ref.add(user.cio_ref, user)
        return user

    def _index_email(self, user: _User) -> None:
        if user.email is None:
            return
        # Inbound emails are ASCII (see mapping.parse_email), so Python's lower() is SQL's.
        self.by_email.add(user.email.lower(), user)
        if self._mapping == "email":
            self.by_mapping.add(user.email.lower(), user)

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
                rows = await session.execute(select(*_COLUMNS).where(USERS.c.id.in_(lost)))
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
