"""Breaking-change check for the protobuf contract: today's descriptors against the released ones.

Rules (proto3 wire and JSON compatibility): a released message, enum, service or method stays; a
released field keeps its number, name, type and label, or its number and name are reserved; a
released enum value keeps its number and name.
"""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import descriptor_pb2, json_format

RELEASED = Path(__file__).parent / "released" / "switchboard_v1.json"


def current_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    from switchboard.v1 import chat_pb2, events_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    for module in (events_pb2, chat_pb2):
        module.DESCRIPTOR.CopyToProto(fds.file.add())
    return fds


def load_released(path: Path = RELEASED) -> descriptor_pb2.FileDescriptorSet:
    return json_format.Parse(path.read_text(), descriptor_pb2.FileDescriptorSet())


def save_released(path: Path = RELEASED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json_format.MessageToDict(current_descriptor_set())
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def _messages(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, msg: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{msg.name}"
        found[name] = msg
        for nested in msg.nested_type:
            walk(name, nested)

    for f in fds.file:
        for m in f.message_type:
            walk(f.package, m)
    return found


def _enums(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.EnumDescriptorProto]:
    found = {f"{f.package}.{e.name}": e for f in fds.file for e in f.enum_type}
    for name, msg in _messages(fds).items():
        for e in msg.enum_type:
            found[f"{name}.{e.name}"] = e
    return found


def breaking_changes(
    released: descriptor_pb2.FileDescriptorSet, current: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    problems: list[str] = []
    old_msgs, new_msgs = _messages(released), _messages(current)
    for name, old in old_msgs.items():
        new = new_msgs.get(name)
        if new is None:
            problems.append(f"message {name} was removed")
            continue
        fields = {f.number: f for f in new.field}
        reserved_numbers = {n for r in new.reserved_range for n in range(r.start, r.end)}
        for f in old.field:
            now = fields.get(f.number)
            if now is None:
                if f.number not in reserved_numbers or f.name not in new.reserved_name:
                    problems.append(
                        f"{name}.{f.name} (= {f.number}) was removed without reserving its number and name"
                    )
            elif (now.name, now.type, now.label, now.type_name) != (f.name, f.type, f.label, f.type_name):
                problems.append(f"{name}.{f.name} (= {f.number}) changed name, type or label")
            elif now.HasField("oneof_index") != f.HasField("oneof_index"):
                problems.append(f"{name}.{f.name} (= {f.number}) moved into or out of a oneof")
    old_enums, new_enums = _enums(released), _enums(current)
    for name, old_enum in old_enums.items():
        new_enum = new_enums.get(name)
        if new_enum is None:
            problems.append(f"enum {name} was removed")
            continue
        values = {v.number: v.name for v in new_enum.value}
        for value in old_enum.value:
            if values.get(value.number) != value.name:
                problems.append(f"enum value {name}.{value.name} (= {value.number}) was removed or renamed")
    new_services = {f"{fd.package}.{s.name}": s for fd in current.file for s in fd.service}
    for fd in released.file:
        for s in fd.service:
            full = f"{fd.package}.{s.name}"
            now_service = new_services.get(full)
            if now_service is None:
                problems.append(f"service {full} was removed")
                continue
            methods = {m.name: m for m in now_service.method}
            for m in s.method:
                now_method = methods.get(m.name)
                if now_method is None:
                    problems.append(f"rpc {full}.{m.name} was removed")
                elif (
                    now_method.input_type,
                    now_method.output_type,
                    now_method.client_streaming,
                    now_method.server_streaming,
                ) != (
                    m.input_type,
                    m.output_type,
                    m.client_streaming,
                    m.server_streaming,
                ):
                    problems.append(f"rpc {full}.{m.name} changed its signature")
    return problems


if __name__ == "__main__":
    save_released()
    print(f"wrote {RELEASED}")
