import copy

from google.protobuf import descriptor_pb2

from schemas.compat import breaking_changes, current_descriptor_set, load_released


def test_contract_has_no_breaking_change_against_the_release():
    assert breaking_changes(load_released(), current_descriptor_set()) == []


def _find(fds: descriptor_pb2.FileDescriptorSet, name: str) -> descriptor_pb2.DescriptorProto:
    return next(m for f in fds.file for m in f.message_type if m.name == name)


def test_the_check_catches_a_reused_tag_and_a_removed_field():
    released = current_descriptor_set()
    changed = copy.deepcopy(released)
    event = _find(changed, "MessageReceived")
    text = next(f for f in event.field if f.name == "text")
    text.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    envelope = _find(changed, "Event")
    envelope.field.remove(next(f for f in envelope.field if f.name == "causation_id"))
    problems = breaking_changes(released, changed)
    assert any("MessageReceived.text" in p for p in problems)
    assert any("Event.causation_id" in p and "reserving" in p for p in problems)


def test_adding_a_field_is_fine_and_reserving_a_removed_one_is_fine():
    released = current_descriptor_set()
    changed = copy.deepcopy(released)
    envelope = _find(changed, "Event")
    envelope.field.add(
        name="new_field", number=99, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=1
    )
    envelope.field.remove(next(f for f in envelope.field if f.name == "causation_id"))
    envelope.reserved_range.add(start=5, end=6)
    envelope.reserved_name.append("causation_id")
    assert breaking_changes(released, changed) == []
