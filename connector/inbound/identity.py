"""Finding the user an inbound event is about, or creating one with what is known."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from connector.db.models import User
from connector.inbound.mapping import Identity


def _by_customer_id(customer_id: str, user_id_mapping: str) -> Any:
    """Users whose customer id (as the outbound sync sends it) is ``customer_id``."""
    if user_id_mapping == "external_id":
        return User.external_id == customer_id
    if user_id_mapping == "email":
        return func.lower(User.email) == customer_id.lower()
    if user_id_mapping == "id":
        return User.id == customer_id
    return User.attributes[user_id_mapping].as_string() == customer_id


async def _first(session: AsyncSession, condition: Any) -> User | None:
    query = select(User).where(condition).order_by(User.created_at, User.id).limit(1)
    return (await session.scalars(query)).first()


async def find_user(session: AsyncSession, identity: Identity, user_id_mapping: str) -> User | None:
    """By customer id (what was sent as the id, else the mapped attribute), then email, then
    Customer.io's ``cio_id``."""
    if identity.customer_id:
        user = await _first(session, User.cio_id == identity.customer_id)
        if user is None:
            user = await _first(session, _by_customer_id(identity.customer_id, user_id_mapping))
        if user is not None:
            return user
    if identity.email:
        user = await _first(session, func.lower(User.email) == identity.email.lower())
        if user is not None:
            return user
    if identity.cio_id:
        return await _first(session, User.cio_ref == identity.cio_id)
    return None


def _new_user(identity: Identity, user_id_mapping: str) -> User:
    key = identity.customer_id or identity.email or identity.cio_id
    attributes: dict[str, Any] = {}
    if identity.email:
        attributes["email"] = identity.email
    if identity.customer_id and user_id_mapping not in ("id", "email"):
        attributes[user_id_mapping] = identity.customer_id
    return User(
        id=f"cio:{key}",
        external_id=identity.customer_id if user_id_mapping == "external_id" else None,
        email=identity.email,
        attributes=attributes,
        anonymous_ids=[],
        account={},
        segments=[],
        cio_id=identity.customer_id,
        cio_ref=identity.cio_id,
        sync_status="inbound",
        version=0,
        pending=False,
        attempts=0,
    )


async def find_or_create_user(
    session: AsyncSession, identity: Identity, user_id_mapping: str
) -> User:
    """The user of ``identity`` (which must not be empty), learning its ``cio_id`` on the way."""
    user = await find_user(session, identity, user_id_mapping)
    if user is None:
        candidate = _new_user(identity, user_id_mapping)
        try:
            async with session.begin_nested():
                session.add(candidate)
            return candidate
        except IntegrityError:
            # Another instance created the same user a moment ago.
            user = await session.get(User, candidate.id)
            if user is None:
                raise
    if identity.cio_id and not user.cio_ref:
        user.cio_ref = identity.cio_id
    if identity.email and not user.email:
        user.email = identity.email
    return user
