import grpc
import pytest

from services.ingress import RequestRejected
from services.ingress import _validation as v


def code_of(fn, *args) -> grpc.StatusCode:
    with pytest.raises(RequestRejected) as info:
        fn(*args)
    assert info.value.message  # every rejection says what is wrong
    return info.value.code


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text(text):
    assert code_of(v.check_text, text, 8192) == grpc.StatusCode.INVALID_ARGUMENT


def test_text_limit_counts_utf8_bytes():
    v.check_text("好" * 2730, 8192)  # 8190 bytes
    with pytest.raises(RequestRejected, match="8193 bytes"):
        v.check_text("好" * 2731, 8193 - 3)


def test_control_characters_are_refused_but_newlines_are_fine():
    v.check_text("line one\nline two\ttabbed\r\n", 8192)
    with pytest.raises(RequestRejected, match="U\\+0000"):
        v.check_text("nul\x00byte", 8192)


@pytest.mark.parametrize("value", ["c\n1", "c\r\nX-Evil: 1", "en\n", "a\tb", "nul\x00"])
def test_single_line_values_refuse_line_breaks_and_every_other_control_character(value):
    assert code_of(v.check_one_line, value, "customer_id", 128) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v.check_metadata, {value: "x"}, 32) == grpc.StatusCode.INVALID_ARGUMENT
    v.check_one_line("客户 42 (vip)", "customer_id", 128)
    v.check_metadata({"note": "line one\nline two"}, 32)  # a value may span lines


@pytest.mark.parametrize("tenant", ["", " acme", "a/b", "x" * 65])
def test_bad_tenants(tenant):
    assert code_of(v.check_tenant, tenant, frozenset()) == grpc.StatusCode.INVALID_ARGUMENT


def test_tenant_allow_list():
    v.check_tenant("acme", frozenset({"acme"}))
    assert code_of(v.check_tenant, "other", frozenset({"acme"})) == grpc.StatusCode.PERMISSION_DENIED


def test_ids():
    v.check_conversation_id("0190f3a2-7c1e-7000-8000-000000000000")
    assert code_of(v.check_conversation_id, "") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v.check_conversation_id, "../etc") == grpc.StatusCode.INVALID_ARGUMENT
    v.check_conversation_id("", required=False)
    assert code_of(v.check_client_message_id, "") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v.check_client_message_id, "x" * 129) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("key", [" ", "   ", "\u3000", " m1", "m1 ", "\u00a0m1"])
def test_a_blank_or_space_padded_client_message_id_is_refused(key):
    """A new user's walkthrough: "   " was accepted as an idempotency key, and " m1" and "m1" were
    two keys, so a client that trims on its retry path sent the message twice."""
    with pytest.raises(v.RequestRejected) as caught:
        v.check_client_message_id(key)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "surrounding spaces" in caught.value.message or "blank" in caught.value.message


def test_a_client_message_id_may_hold_inner_spaces():
    v.check_client_message_id("order 42 / msg 1")


def test_metadata_limits():
    v.check_metadata({"plan": "pro"}, 4)
    assert code_of(v.check_metadata, {str(i): "v" for i in range(5)}, 4) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v.check_metadata, {"": "v"}, 4) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "check,value",
    [
        (lambda x: v.check_tenant(x, frozenset()), "acme\n"),
        (v.check_conversation_id, "conv-1\n"),
        (v.check_client_message_id, "m1\n"),
    ],
)
def test_a_trailing_newline_is_not_part_of_a_valid_id(check, value):
    # `$` matches before a trailing newline; the checks are whole-string matches.
    assert code_of(check, value) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_cursor_is_a_whole_string_match():
    from schemas.hotview import is_valid_cursor

    assert is_valid_cursor("5-1")
    assert not is_valid_cursor("5-1\n")


def test_only_redis_outages_are_unavailable():
    from redis import exceptions as r

    from services.ingress._errors import as_rejection

    for outage in (r.ConnectionError("x"), r.TimeoutError("x"), r.BusyLoadingError("x"), ConnectionError()):
        assert as_rejection(outage, "t").code == grpc.StatusCode.UNAVAILABLE
    # Said in words, not as a class name of a client library.
    loading = as_rejection(r.BusyLoadingError("Redis is loading the dataset in memory"), "t").message
    assert "Redis (loading its data after a restart) is unavailable" in loading and "Error" not in loading
    assert as_rejection(r.ConnectionError("x"), "t").message == "Redis is unavailable; retry"
    for bug in (r.ResponseError("WRONGTYPE"), r.DataError("x"), r.NoScriptError("x")):
        rejection = as_rejection(bug, "t")
        assert rejection.code == grpc.StatusCode.INTERNAL and "incident" in rejection.message


def test_redis_refusals_of_its_own_state_are_outages_not_poison() -> None:
    """Under maxmemory (noeviction) or a failed save, Redis refuses every write: a sessions batch
    must be retried, not dead-lettered record by record (its health probe, a PING, passes), and
    the ingress answers UNAVAILABLE (review, twenty-first session)."""
    from redis import exceptions as r

    from services.ingress._errors import as_rejection
    from streams._consumer import is_outage

    for state in (
        r.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        r.ResponseError(
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"
        ),
        r.ResponseError(
            "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT."
        ),
        r.ResponseError("NOREPLICAS Not enough good replicas to write."),
    ):
        assert is_outage(state), state
        assert as_rejection(state, "t").code == grpc.StatusCode.UNAVAILABLE
    for data in (
        r.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        r.ResponseError("BUSYGROUP Consumer Group name already exists"),
        r.ResponseError("BUSYKEY Target key name already exists."),
    ):
        assert not is_outage(data), data


def test_clickhouse_errors_of_the_servers_state_are_outages_not_poison() -> None:
    """A projector batch that ClickHouse refuses for its own state (too many parts, a read-only
    table, memory) is retried; only an error of the data itself may dead-letter a record."""
    from clickhouse_connect.driver.exceptions import DatabaseError

    from streams._consumer import is_outage

    too_many_parts = DatabaseError(
        "HTTPDriver for http://127.0.0.1:8123 received ClickHouse error code 252\\n Code: 252. "
        "DB::Exception: Too many parts (3001). Merges are processing significantly slower than inserts"
    )
    read_only = DatabaseError("Code: 242. DB::Exception: Table is in readonly mode. (TABLE_IS_READ_ONLY)")
    bad_data = DatabaseError(
        "Code: 27. DB::Exception: Cannot parse input: expected '\\t'. (CANNOT_PARSE_INPUT)"
    )
    assert is_outage(too_many_parts)
    assert is_outage(read_only)
    assert not is_outage(bad_data)


def test_a_write_on_a_connection_redis_just_closed_is_unavailable_not_internal() -> None:
    """Seen in the soak (Redis kill -9 under load): uvloop raised RuntimeError from a pipeline's
    write on the closed connection, and the caller got INTERNAL for what is an outage."""
    from services.ingress._errors import as_rejection

    closed = RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False 0x7f>; the handler is closed"
    )
    assert as_rejection(closed, "SendMessage").code == grpc.StatusCode.UNAVAILABLE
    assert as_rejection(RuntimeError("a bug of ours"), "SendMessage").code == grpc.StatusCode.INTERNAL


def test_the_ingress_and_the_processors_take_the_same_failures_for_outages() -> None:
    """They kept a list each, and the lists drifted: a write on a connection Redis had just
    closed (uvloop's RuntimeError, above) was an outage to the ingress but poison to a processor,
    whose batch would have been bisected towards the dead-letter topic."""
    from aiokafka.errors import KafkaConnectionError, NotLeaderForPartitionError, RecordTooLargeError
    from redis import exceptions as r

    from services.ingress._errors import as_rejection
    from streams._consumer import is_outage

    closed = RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")
    outages = [
        closed,
        r.ConnectionError("x"),
        r.TimeoutError("x"),
        r.BusyLoadingError("x"),
        r.ReadOnlyError("x"),
        ConnectionResetError(),
        TimeoutError(),
        KafkaConnectionError(),
        NotLeaderForPartitionError(),
    ]
    bugs = [RuntimeError("a bug of ours"), r.ResponseError("WRONGTYPE"), RecordTooLargeError(), KeyError("k")]
    for exc in outages:
        assert is_outage(exc), exc
        assert as_rejection(exc, "t").code == grpc.StatusCode.UNAVAILABLE, exc
    for exc in bugs:
        assert not is_outage(exc), exc
        assert as_rejection(exc, "t").code == grpc.StatusCode.INTERNAL, exc


def test_a_malformed_request_says_utf_8_only_when_that_is_the_cause():
    utf8 = v.MalformedRequest("switchboard.v1.SendMessageRequest", "...: String field had bad UTF-8")
    corrupt = v.MalformedRequest("switchboard.v1.SendMessageRequest", "...: Wire format was corrupt")
    assert "must be valid UTF-8" in utf8.rejection().message
    assert "UTF-8" not in corrupt.rejection().message and "corrupt" in corrupt.rejection().message


@pytest.mark.parametrize("value", ["   ", " c1", "c1 ", "c\u202e1", "\u200bc1", "c1\ufeff"])
def test_a_customer_id_given_is_printable_without_surrounding_spaces(value):
    """Seen (a new user's trial): StartConversation took blank, leading-space and right-to-left
    override customer ids, which every other id refuses (they look like another customer in an
    agent's console and in analytics)."""
    assert code_of(v.check_customer_id, value) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_customer_id_may_be_absent_or_any_printable_text():
    for value in ("", "c1", "客户 42 (vip)", "user@example.com", "山田\u3000太郎", "Zoë\u00a0K"):
        v.check_customer_id(value)


@pytest.mark.parametrize("cursor", ["١٢-١", "１２-１", "٥-١.0123456789", "12-1\n", "12-1 "])
def test_a_cursor_is_ascii_digits_only(cursor: str) -> None:
    """Review (s29): Python's \\d took other scripts' digits, which int() reads as numbers, so
    such a cursor passed every check and then failed the shared XREAD of every live stream on its
    reader, other tenants' included."""
    from schemas.hotview import is_valid_cursor
    from services.ingress._reads import conversation_tag, stream_position
    from services.ingress._validation import RequestRejected

    assert not is_valid_cursor(cursor.partition(".")[0])
    with pytest.raises(RequestRejected) as err:
        stream_position(cursor, conversation_tag("t", "c"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_cursor_names_its_conversation() -> None:
    from services.ingress._reads import conversation_tag, public_cursor, stream_position
    from services.ingress._validation import RequestRejected

    tag = conversation_tag("t", "c")
    assert stream_position(public_cursor("12-1", tag), tag) == "12-1"
    assert stream_position("12-1", tag) == "12-1"  # a bare cursor from before tags
    assert public_cursor("", tag) == ""
    # Another conversation's, another tenant's conversation of the same id, and one whose ids
    # would join to the same string.
    for other in (conversation_tag("t", "d"), conversation_tag("u", "c"), conversation_tag("tc", "")):
        assert other != tag
        with pytest.raises(RequestRejected) as err:
            stream_position(public_cursor("12-1", other), tag)
        assert "another conversation" in err.value.message
    # A tag that is not one (malformed) is not "another conversation's".
    for malformed in ("12-1.", "12-1.ABCDEF0123", "12-1.0123", f"12-1.{tag}.x", f"12-1.{tag} "):
        with pytest.raises(RequestRejected) as err:
            stream_position(malformed, tag)
        assert "not a cursor" in err.value.message, malformed
