"""Runs in any environment (the project's, or a peer's venv): the wire shape of every message,
enum and service in the given generated modules, as one JSON line keyed by full name. Usage:
python proto_descriptors.py MODULE... (tritonclient.grpc.service_pb2, ...)."""

import importlib
import json
import sys


def repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6.31: `label` is deprecated
        return bool(field.is_repeated)
    return field.label == field.LABEL_REPEATED


def field_shape(field) -> dict:
    kind = field.message_type or field.enum_type
    return {
        "name": field.name,
        "type": field.type,  # wire type family: int64 vs uint64 vs string ... differ here
        "repeated": repeated(field),
        "type_name": kind.full_name if kind is not None else "",
    }


def shapes(module) -> dict:
    found: dict = {}

    def message(descriptor) -> None:
        found[descriptor.full_name] = {
            "kind": "message",
            "fields": {str(f.number): field_shape(f) for f in descriptor.fields},
        }
        for nested in descriptor.nested_types:
            message(nested)
        for nested in descriptor.enum_types:
            enum(nested)

    def enum(descriptor) -> None:
        found[descriptor.full_name] = {
            "kind": "enum",
            "values": {value.name: value.number for value in descriptor.values},
        }

    file = module.DESCRIPTOR
    for descriptor in file.message_types_by_name.values():
        message(descriptor)
    for descriptor in file.enum_types_by_name.values():
        enum(descriptor)
    for service in file.services_by_name.values():
        found[service.full_name] = {
            "kind": "service",
            "methods": {
                m.name: [
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.client_streaming,
                    m.server_streaming,
                ]
                for m in service.methods
            },
        }
    return found


def main() -> None:
    found: dict = {}
    for name in sys.argv[1:]:
        found.update(shapes(importlib.import_module(name)))
    print(json.dumps(found))


if __name__ == "__main__":
    main()
