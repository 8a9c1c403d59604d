"""What one pending user needs this pass: delete, skip, anonymous events, or identify and events.

Pure: a :class:`UserSnapshot` and the settings in, a :class:`UserPlan` out (SPEC §5 steps
2 to 7). Missing credentials (step 1) are the caller's business, and so is the deletion
guard (``sync.max_deletions_per_pass``, applied by the engine to the pass as a whole).

Deletion means **left** (:func:`has_left`). The connector identifies a user only while it is
in a whitelisted segment or came through ``/batch``, and every identify sends
``hull_segments``, the names of all its segments; what Customer.io confirmed is kept in
``sent_attributes``. So a user *was in a whitelisted segment when it was last sent* exactly
when the ``hull_segments`` last sent names a whitelisted segment. Names, not ids, are all
Customer.io holds, so the names of the whitelisted segments (from the catalog of what the
platform sent) come in with the plan: a whitelisted segment renamed since the user was last
sent, or a segment whose name was never seen, fails towards *not* deleting. A user that came
only through ``/batch`` or ``import`` outside the whitelisted segments never left anything.
A user this connector never identified counts as created and left when its platform traits
carry Hull's ``customerio/created_at`` without ``customerio/deleted_at`` (written by Hull's
own connector, which created only users in its whitelisted segments).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from connector.notifications.parse import PlatformEvent
from connector.outbound import mapping
from connector.outbound.operations import (
    DeleteCustomer,
    Identify,
    PlanAction,
    Track,
    UserPlan,
    UserSnapshot,
)
from connector.settings.model import ConnectorSettings

NOT_IN_SEGMENTS = "not in any whitelisted segment"
ALREADY_DELETED = "already deleted from Customer.io"
USER_DELETED = "user deleted from Customer.io"
NO_CHANGES = "no changes"
FROM_CUSTOMERIO = "came from Customer.io"
NOT_IN_EVENTS_FILTER = "not in events_filter"
PAGE_WITHOUT_URL = "page view without a url (properties.url or context.page_url)"
NEVER_IN_SEGMENTS = "not in any whitelisted segment (never was when sent: not deleted)"

HULL_CREATED_AT = "customerio/created_at"
HULL_DELETED_AT = "customerio/deleted_at"
"""Traits Hull's own Customer.io connector writes on the platform's users."""


def is_deleted(user: UserSnapshot) -> bool:
    """Whether Customer.io deleted the customer after (or when) it was last created there."""
    deleted, created = user.cio_deleted_at, user.cio_created_at
    if deleted is None:
        return False
    return created is None or mapping.as_utc(deleted) >= mapping.as_utc(created)


def in_segments(user: UserSnapshot, settings: ConnectorSettings) -> bool:
    """Whether the user is to be synced: in a whitelisted segment, or sent through ``/batch``."""
    segment_ids = {str(segment.get("id")) for segment in user.segments}
    return user.via_batch or bool(segment_ids & set(settings.synchronized_segments))


def created_by_hull(user: UserSnapshot) -> bool:
    """Whether Hull's own connector created the person in Customer.io and did not delete it."""
    traits = user.attributes
    return traits.get(HULL_CREATED_AT) is not None and traits.get(HULL_DELETED_AT) is None


def has_left(user: UserSnapshot, whitelisted_names: Collection[str]) -> bool:
    """Whether the user, now in no whitelisted segment, *left* one (see the module's notes).

    When this connector identified the user, the ``hull_segments`` last sent decides: it left
    iff that names one of ``whitelisted_names``. When it never did (nothing sent, or deleted
    since), Hull's ``customerio/created_at`` trait without ``customerio/deleted_at`` counts
    as created and left.
    """
    if user.cio_created_at is not None and not is_deleted(user):
        sent = user.sent_attributes.get("hull_segments")
        if not isinstance(sent, list):
            return False
        return bool({str(name) for name in sent} & set(whitelisted_names))
    return user.cio_deleted_at is None and created_by_hull(user)


def _skip_all(events: Iterable[PlatformEvent], reason: str) -> dict[str, str]:
    return {event.event_id: reason for event in events}


def _skip(user: UserSnapshot, reason: str) -> UserPlan:
    return UserPlan(
        user_id=user.id,
        action=PlanAction.SKIP,
        skip_reason=reason,
        skipped_events=_skip_all(user.events, reason),
    )


def plan_events(
    user: UserSnapshot,
    settings: ConnectorSettings,
    *,
    customer_id: str | None = None,
    anonymous_id: str | None = None,
) -> tuple[list[Track], dict[str, str]]:
    """The user's pending events to send, in order, and those not sent ``{event_id: reason}``.

    Events from Customer.io are never sent back; only names in ``events_filter`` go out; an
    event named ``page`` is a page view (skipped without a url); events over Customer.io's
    size limits are skipped.
    """
    tracks: list[Track] = []
    skipped: dict[str, str] = {}
    for event in user.events:
        page = event.name == "page"
        if mapping.is_from_customerio(event):
            skipped[event.event_id] = FROM_CUSTOMERIO
            continue
        if event.name not in settings.events_filter:
            skipped[event.event_id] = NOT_IN_EVENTS_FILTER
            continue
        name, data = mapping.page_view(event) if page else (event.name, dict(event.properties))
        if name is None:
            skipped[event.event_id] = PAGE_WITHOUT_URL
            continue
        error = mapping.event_error(name, data, page=page)
        if error:
            skipped[event.event_id] = error
            continue
        tracks.append(
            Track(
                name=name,
                data=data,
                timestamp=mapping.event_timestamp(event.occurred_at),
                id=mapping.event_ulid(event.event_id, event.occurred_at),
                source_event_id=event.event_id,
                customer_id=customer_id,
                anonymous_id=anonymous_id,
                page=page,
            )
        )
    return tracks, skipped


def _delete_target(
    user: UserSnapshot,
    settings: ConnectorSettings,
    cid: str | None,
    whitelisted_names: Collection[str],
) -> str | None:
    if not settings.enable_user_deletion or not has_left(user, whitelisted_names):
        return None
    target = user.cio_id or cid
    if target is None or mapping.customer_id_error(target):
        return None
    return target


def _plan_anonymous(user: UserSnapshot, settings: ConnectorSettings, otherwise: str) -> UserPlan:
    tracks, skipped = plan_events(user, settings, anonymous_id=user.anonymous_ids[-1])
    if not tracks:
        return UserPlan(
            user_id=user.id, action=PlanAction.SKIP, skip_reason=otherwise, skipped_events=skipped
        )
    return UserPlan(
        user_id=user.id,
        action=PlanAction.ANONYMOUS,
        operations=tuple(tracks),
        skipped_events=skipped,
    )


def plan_user(
    user: UserSnapshot, settings: ConnectorSettings, *, whitelisted_names: Collection[str]
) -> UserPlan:
    """Plan one user's operations (SPEC §5, steps 2 to 7), in the order they must run.

    ``whitelisted_names`` are the names of the segments in ``synchronized_segments``.

    - Not in a whitelisted segment (nor via ``/batch``): DELETE when deletion is on and the
      user :func:`has_left` (and so exists in Customer.io); else, with ``anonymous_events``
      on and no customer id, its whitelisted events go out anonymously; else SKIP. Pending
      events are not sent.
    - No customer id: ANONYMOUS events as above when possible, else SKIP.
    - A customer id over Customer.io's limit: SKIP.
    - Otherwise SEND: identify calls with every attribute (first time, ``full``, or after a
      deletion) or only the changed ones, chunked at ``max_attributes_per_call``, then the
      events. Nothing to identify and no events: SKIP with ``no changes``.
    """
    cid = mapping.customer_id(user, settings.user_id_mapping)
    anonymous = cid is None and settings.anonymous_events and bool(user.anonymous_ids)

    if not in_segments(user, settings):
        target = _delete_target(user, settings, cid, whitelisted_names)
        if target is not None:
            return UserPlan(
                user_id=user.id,
                action=PlanAction.DELETE,
                customer_id=target,
                operations=(DeleteCustomer(target),),
                skipped_events=_skip_all(user.events, USER_DELETED),
            )
        reason = NOT_IN_SEGMENTS
        if settings.enable_user_deletion and is_deleted(user):
            reason = ALREADY_DELETED
        elif settings.enable_user_deletion and user.cio_created_at is not None:
            reason = NEVER_IN_SEGMENTS
        return _plan_anonymous(user, settings, reason) if anonymous else _skip(user, reason)

    if cid is None:
        reason = f"no customer id: user has no '{settings.user_id_mapping}'"
        return _plan_anonymous(user, settings, reason) if anonymous else _skip(user, reason)

    id_error = mapping.customer_id_error(cid)
    if id_error:
        return _skip(user, id_error)

    attributes, errors = mapping.build_attributes(user, settings)
    if user.full or not user.sent_attributes or is_deleted(user):
        to_identify = attributes
    else:
        to_identify = mapping.changed_attributes(attributes, user.sent_attributes)
    size = min(settings.max_attributes_per_call, mapping.MAX_ATTRIBUTES_PER_CALL)
    identifies = [Identify(cid, chunk) for chunk in mapping.chunk_attributes(to_identify, size)]
    tracks, skipped = plan_events(user, settings, customer_id=cid)

    if not identifies and not tracks:
        return UserPlan(
            user_id=user.id,
            action=PlanAction.SKIP,
            customer_id=cid,
            skip_reason=NO_CHANGES,
            attributes=attributes,
            attribute_errors=errors,
            skipped_events=skipped,
        )
    return UserPlan(
        user_id=user.id,
        action=PlanAction.SEND,
        customer_id=cid,
        operations=(*identifies, *tracks),
        attributes=attributes,
        attribute_errors=errors,
        skipped_events=skipped,
    )
