"""Which user a message is about, for both pipelines: the webhooks' bulk resolution against one
lookup at a time, and the merge of users created from webhooks into the users the platform sends
(through the running service, and the pure rule as a table)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.models import User
from connector.db.types import utcnow
from connector.inbound.mapping import Identity
from connector.notifications.parse import UserMessage
from connector.runtime import Runtime, open_runtime
from connector.users.identity import (
    PlatformUser,
    StoredUser,
    WebhookUser,
    candidate_id,
    new_user_row,
    resolve_messages,
    resolve_users,
    webhook_users_to_merge,
)

from ..conftest import ADMIN, INGEST
from ..helpers import message, notification, webhook
from ..inbound.test_service import (
    configure,
    events,
    post_webhook,
    stats,
    wait_processed,
    webhook_path,
)

OLD = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
async def runtime(make_config) -> AsyncIterator[Runtime]:
    async with open_runtime(make_config()) as runtime:
        yield runtime


# -- merging users created from webhooks into the platform's ---------------------------------


async def get_user(client, user_id: str) -> tuple[int, dict[str, Any]]:
    resp = await client.get(f"/api/users/{user_id}", headers=ADMIN)
    return resp.status, await resp.json()


async def send(client, *messages: dict[str, Any]) -> None:
    resp = await client.post("/smart-notifier", json=notification(*messages), headers=INGEST)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["rejected"] == []


async def receive(client, *payloads: dict[str, Any]) -> None:
    """Post the webhooks and wait until every delivery stored so far has been processed."""
    path = await webhook_path(client)
    for payload in payloads:
        assert (await post_webhook(client, path, payload)).status == 200
    await wait_processed(client, sum((await stats(client))["deliveries"].values()))


def tracked_names(user: dict[str, Any]) -> list[str]:
    return sorted(event["event_id"] for event in user["tracked_events"])


async def test_identity_platform_user_takes_over_the_webhook_user_of_its_customer_id(start_app):
    client = await start_app()
    await receive(client, webhook("e1", customer_id="ext-1", cio_id="ref-1"))
    status, early = await get_user(client, "cio:ext-1")
    assert status == 200
    assert tracked_names(early) == ["e1"]

    await send(client, message("u1", external_id="ext-1", email="ana@example.com"))
    status, user = await get_user(client, "u1")
    assert status == 200
    assert tracked_names(user) == ["e1"]
    assert user["customerio"]["cio_id"] == "ref-1"
    assert user["external_id"] == "ext-1"
    assert user["sync"]["status"] == "pending"
    assert (await get_user(client, "cio:ext-1"))[0] == 404
    assert [(e["event_id"], e["user_id"]) for e in (await events(client))["events"]] == [
        ("e1", "u1")
    ]

    # Later webhooks for that customer land on the platform's user.
    await receive(client, webhook("e2", customer_id="ext-1", metric="clicked"))
    assert tracked_names((await get_user(client, "u1"))[1]) == ["e1", "e2"]
    assert (await get_user(client, "cio:ext-1"))[0] == 404


async def test_identity_platform_user_takes_over_the_webhook_user_of_its_email(start_app):
    client = await start_app()
    await receive(client, webhook("e1", email="Ana@Example.com"))
    assert (await get_user(client, "cio:Ana@example.com"))[0] == 200

    await send(client, message("u1", external_id="ext-1", email="ana@example.com"))
    _, user = await get_user(client, "u1")
    assert tracked_names(user) == ["e1"]
    assert (await get_user(client, "cio:Ana@example.com"))[0] == 404
    await receive(client, webhook("e2", email="ANA@example.com"))
    assert tracked_names((await get_user(client, "u1"))[1]) == ["e1", "e2"]


async def test_identity_no_merge_when_the_customer_ids_differ(start_app):
    client = await start_app()
    await receive(client, webhook("e1", customer_id="ext-2", email="ana@example.com"))

    await send(client, message("u1", external_id="ext-1", email="ana@example.com"))
    _, user = await get_user(client, "u1")
    assert user["tracked_events"] == []
    status, other = await get_user(client, "cio:ext-2")
    assert status == 200
    assert tracked_names(other) == ["e1"]


async def test_identity_merges_every_webhook_user_of_the_person(start_app):
    client = await start_app()
    await receive(
        client,
        webhook("e1", customer_id="ext-1"),
        webhook("e2", email="ana@example.com", cio_id="ref-2"),
        webhook("e3", cio_id="ref-3"),
    )
    await send(client, message("u1", external_id="ext-1", email="ana@example.com"))
    _, user = await get_user(client, "u1")
    assert tracked_names(user) == ["e1", "e2"]
    assert user["customerio"]["cio_id"] == "ref-2"
    assert (await get_user(client, "cio:ext-1"))[0] == 404
    assert (await get_user(client, "cio:ana@example.com"))[0] == 404
    # Nothing ties Customer.io's cio_id alone to the platform's user.
    assert tracked_names((await get_user(client, "cio:ref-3"))[1]) == ["e3"]


async def test_identity_first_platform_user_of_a_batch_wins(start_app):
    client = await start_app()
    await receive(client, webhook("e1", customer_id="ext-1"))
    await send(
        client,
        message("u1", external_id="ext-1", email=None),
        message("u2", external_id="ext-1", email=None),
    )
    assert tracked_names((await get_user(client, "u1"))[1]) == ["e1"]
    assert (await get_user(client, "u2"))[1]["tracked_events"] == []
    assert (await get_user(client, "cio:ext-1"))[0] == 404


@pytest.mark.parametrize("same_batch", [False, True])
async def test_identity_webhook_user_given_platform_data_is_not_merged(start_app, same_batch):
    client = await start_app()
    await receive(client, webhook("e1", customer_id="ext-1"))
    # A message without user.id is found by external_id: the webhook user becomes the
    # platform's own.
    keyless = message(None, external_id="ext-1", email=None)
    keyed = message("u1", external_id="ext-1", email=None)
    if same_batch:
        await send(client, keyless, keyed)
    else:
        await send(client, keyless)
        await send(client, keyed)
    status, kept = await get_user(client, "cio:ext-1")
    assert status == 200
    assert tracked_names(kept) == ["e1"]
    assert kept["sync"]["status"] == "pending"
    assert (await get_user(client, "u1"))[1]["tracked_events"] == []


async def test_identity_merge_follows_user_id_mapping(start_app):
    client = await start_app()
    await configure(client, user_id_mapping="crm_id")
    await receive(client, webhook("e1", customer_id="crm-7"))
    await send(client, message("u1", external_id="ext-1", email=None, traits_crm_id="crm-7"))
    assert tracked_names((await get_user(client, "u1"))[1]) == ["e1"]
    assert (await get_user(client, "cio:crm-7"))[0] == 404


def _w(user_id: str, customer_id: str | None = None, email: str | None = None) -> WebhookUser:
    return WebhookUser(id=user_id, customer_id=customer_id, email=email, cio_ref=None)


def _p(user_id: str, customer_id: str | None = None, email: str | None = None) -> PlatformUser:
    return PlatformUser(id=user_id, customer_id=customer_id, email=email)


@pytest.mark.parametrize(
    ("mapping", "platform", "webhook_users", "expected"),
    [
        ("external_id", [_p("u1", "c1")], [_w("cio:c1", "c1")], {"u1": ["cio:c1"]}),
        ("external_id", [_p("u1", "c1")], [_w("cio:c2", "c2")], {}),
        # Customer ids are compared exactly, emails case-insensitively.
        ("external_id", [_p("u1", "C1")], [_w("cio:c1", "c1")], {}),
        (
            "external_id",
            [_p("u1", None, "A@x.io")],
            [_w("cio:a", None, "a@X.io")],
            {"u1": ["cio:a"]},
        ),
        # An email does not merge a webhook user whose customer id is another's, or unknown
        # on the platform's side.
        ("external_id", [_p("u1", "c1", "a@x.io")], [_w("cio:c2", "c2", "a@x.io")], {}),
        ("external_id", [_p("u1", None, "a@x.io")], [_w("cio:c2", "c2", "a@x.io")], {}),
        (
            "external_id",
            [_p("u1", "c1", "a@x.io")],
            [_w("cio:c1", "c1", "b@x.io")],
            {"u1": ["cio:c1"]},
        ),
        # Under the email mapping the customer id is an email: case-insensitive.
        ("email", [_p("u1", "A@x.io", "A@x.io")], [_w("cio:a", "a@x.io")], {"u1": ["cio:a"]}),
        # Every webhook user of the person, oldest first; the first platform user wins.
        (
            "external_id",
            [_p("u1", "c1", "a@x.io"), _p("u2", "c1", "a@x.io"), _p("u3", "c3")],
            [_w("cio:a", None, "a@x.io"), _w("cio:c1", "c1"), _w("cio:c3", "c3")],
            {"u1": ["cio:a", "cio:c1"], "u3": ["cio:c3"]},
        ),
        ("external_id", [_p("u1")], [_w("cio:r1")], {}),
        ("external_id", [], [_w("cio:c1", "c1")], {}),
    ],
)
def test_identity_webhook_users_to_merge(mapping, platform, webhook_users, expected):
    merges = webhook_users_to_merge(platform, webhook_users, mapping)
    assert {user_id: [w.id for w in taken] for user_id, taken in merges.items()} == expected


# -- the bulk resolution against one lookup at a time ---------------------------------------


async def _first(session: AsyncSession, condition: Any) -> User | None:
    query = select(User).where(condition).order_by(User.created_at, User.id).limit(1)
    return (await session.scalars(query)).first()


async def _reference_find_or_create(
    session: AsyncSession, identity: Identity, mapping: str
) -> User:
    """The resolution as it was done one delivery at a time, query by query."""

    def by_customer_id(customer_id: str) -> Any:
        if mapping == "external_id":
            return User.external_id == customer_id
        if mapping == "email":
            return func.lower(User.email) == customer_id.lower()
        if mapping == "id":
            return User.id == customer_id
        return User.attributes[mapping].as_string() == customer_id

    def mapped_value() -> Any:
        if mapping == "external_id":
            return User.external_id
        if mapping == "email":
            return User.email
        if mapping == "id":
            return User.id
        return User.attributes[mapping].as_string()

    user = None
    if identity.customer_id:
        user = await _first(session, User.cio_id == identity.customer_id)
        if user is None:
            user = await _first(session, by_customer_id(identity.customer_id))
    if user is None and identity.email:
        condition = func.lower(User.email) == identity.email.lower()
        if identity.customer_id:
            # Only a user whose customer id is unknown or the same (SPEC §6).
            mapped = by_customer_id(identity.customer_id)
            condition &= or_(User.cio_id.is_(None), User.cio_id == identity.customer_id)
            condition &= or_(mapped_value().is_(None), mapped)
        user = await _first(session, condition)
    if user is None and identity.cio_id:
        user = await _first(session, User.cio_ref == identity.cio_id)
    if user is None:
        # The INSERT of a new user failed with an IntegrityError when one had its id already
        # (or, held by this session, with a warning first); the user was then taken.
        user = await session.get(User, candidate_id(identity))
        if user is None:
            candidate = User(**new_user_row(identity, mapping, utcnow()))
            session.add(candidate)
            await session.flush()
            return candidate
    if identity.cio_id and not user.cio_ref:
        user.cio_ref = identity.cio_id
    if identity.email and not user.email:
        user.email = identity.email
    return user


async def _user_table(session: AsyncSession) -> list[tuple[Any, ...]]:
    await session.flush()
    rows = await session.scalars(select(User).order_by(User.id))
    return [
        (u.id, u.external_id, u.email, u.cio_id, u.cio_ref, u.attributes, u.sync_status)
        for u in rows
    ]


@pytest.mark.parametrize("mapping", ["external_id", "email", "crm_id"])
async def test_bulk_resolution_matches_one_lookup_at_a_time(runtime, mapping):
    rng = random.Random(f"inbound-{mapping}")
    customer_ids = [None, "c1", "c2", "c3", "x@example.com"]
    emails = [None, "x@example.com", "X@example.com", "y@example.com", "z@example.com"]
    cio_ids = [None, "r1", "r2", "r3"]
    for round_ in range(40):
        async with runtime.sessionmaker() as session, session.begin():
            await session.execute(User.__table__.delete())
            used: set[str] = set()
            for n in range(rng.randint(0, 6)):
                user_id = f"u{n}"
                if n % 3 == 0:  # sometimes the id a new user would get
                    user_id = rng.choice([user_id, f"cio:{rng.choice(customer_ids[1:])}"])
                if user_id in used:
                    user_id = f"u{n}"
                used.add(user_id)
                session.add(
                    User(
                        id=user_id,
                        external_id=rng.choice(customer_ids),
                        email=rng.choice(emails),
                        cio_id=rng.choice(customer_ids[:3]),
                        cio_ref=rng.choice(cio_ids),
                        attributes={"crm_id": rng.choice(customer_ids)},
                        created_at=OLD + timedelta(seconds=rng.choice([0, 0, 1, 2])),
                        version=0,
                        pending=False,
                        attempts=0,
                    )
                )
        identities = []
        while len(identities) < 12:
            identity = Identity(rng.choice(customer_ids), rng.choice(emails), rng.choice(cio_ids))
            if not identity.is_empty:
                identities.append(identity)

        async with runtime.sessionmaker() as session:
            expected = [
                (await _reference_find_or_create(session, identity, mapping)).id
                for identity in identities
            ]
            expected_table = await _user_table(session)
            await session.rollback()
        async with runtime.sessionmaker() as session:
            got = await resolve_users(session, identities, mapping)
            got_table = await _user_table(session)
            await session.rollback()
        assert got == expected, (round_, identities)
        assert got_table == expected_table, (round_, identities)


# -- the platform's messages within one chunk ------------------------------------------------


def platform_message(key=None, external_id=None, email=None) -> UserMessage:
    return UserMessage(
        key=key,
        external_id=external_id,
        email=email,
        anonymous_ids=[],
        attributes={},
        account={},
        segments=[],
        indexed_at=None,
    )


@pytest.mark.parametrize(
    ("stored", "messages", "expected"),
    [
        ([], [("u1", None, None)], ["u1"]),
        ([], [(None, "e1", None), (None, None, "a@x")], ["external_id:e1", "email:a@x"]),
        ([("u1", "e1", "a@x")], [(None, "e1", "a@x"), (None, None, "a@x")], ["u1", "u1"]),
        # The first message leaves u1 without an email.
        ([("u1", "e1", "a@x")], [(None, "e1", None), (None, None, "a@x")], ["u1", "email:a@x"]),
        # Emails are matched as they are (the platform's own users; webhooks ignore case).
        ([("u1", "e1", "a@x")], [(None, None, "A@x")], ["email:A@x"]),
        # The oldest of the stored users wins.
        ([("u1", "e1", None), ("u2", "e1", None)], [(None, "e1", None)], ["u1"]),
        # A message's user answers to its external_id and email for the messages after it...
        ([], [("u1", "e1", "a@x"), (None, "e1", "a@x"), (None, None, "a@x")], ["u1"] * 3),
        # ... and no longer to those it had.
        ([("u1", "e1", None)], [("u1", "e2", None), (None, "e1", None)], ["u1", "external_id:e1"]),
        # Then the next oldest with them is found.
        (
            [("u1", "e1", None), ("u2", "e1", None)],
            [("u1", "e2", None), (None, "e1", None)],
            ["u1", "u2"],
        ),
        # A user created by the chunk is found by the id it was given.
        ([], [(None, "e1", None), ("external_id:e1", "e1", None)], ["external_id:e1"] * 2),
    ],
)
def test_identity_resolve_messages_as_if_one_at_a_time(stored, messages, expected):
    stored_users = [StoredUser(id, external_id, email, None) for id, external_id, email in stored]
    chunk = [platform_message(*fields) for fields in messages]
    assert resolve_messages(chunk, stored_users) == expected
