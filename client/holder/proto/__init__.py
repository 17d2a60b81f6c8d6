"""Protobuf messages of the share-holder service (`holder.proto`), built at run time.

Why not generated `_pb2.py` files: code from a given protoc carries a runtime version check that would
pin `protobuf` to that protoc's release or newer; building the same descriptors here works with every
protobuf the project allows (>=5) and needs no protoc at install. `holder.proto` stays the readable
specification, and a test compiles it with grpc_tools and checks that both describe the same service.
The gRPC side uses generic handlers (`client.holder.service`) and plain multicallables
(`client.vault.stores.grpc`) with these classes' serializers.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

PACKAGE = "facefed.holder.v1"
SERVICE = "ShareHolder"
SERVICE_NAME = f"{PACKAGE}.{SERVICE}"

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _BYTES, _BOOL = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_BOOL
_UINT32, _UINT64, _MESSAGE = _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_MESSAGE

# name -> fields (name, number, type, repeated[, message type]); order and numbers follow holder.proto.
_MESSAGES: dict[str, list[tuple[Any, ...]]] = {
    "PutRequest": [("share_id", 1, _STRING, False), ("data", 2, _BYTES, False)],
    "PutReply": [],
    "PutManyRequest": [("shares", 1, _MESSAGE, True, "PutRequest")],
    "GetRequest": [("share_id", 1, _STRING, False)],
    "GetReply": [("data", 1, _BYTES, False)],
    "GetManyRequest": [("share_ids", 1, _STRING, True)],
    "FoundShare": [("share_id", 1, _STRING, False), ("found", 2, _BOOL, False), ("data", 3, _BYTES, False)],
    "GetManyReply": [("shares", 1, _MESSAGE, True, "FoundShare")],
    "DeleteRequest": [("share_id", 1, _STRING, False)],
    "DeleteReply": [("existed", 1, _BOOL, False)],
    "ListRequest": [("after", 1, _STRING, False), ("limit", 2, _UINT32, False)],
    "ListReply": [("share_ids", 1, _STRING, True)],
    "StatRequest": [],
    "StatReply": [
        ("shares", 1, _UINT64, False),
        ("bytes", 2, _UINT64, False),
        ("writable", 3, _BOOL, False),
        ("max_share_bytes", 4, _UINT64, False),
    ],
}
# rpc name -> (request, reply)
METHODS: dict[str, tuple[str, str]] = {
    "Put": ("PutRequest", "PutReply"),
    "PutMany": ("PutManyRequest", "PutReply"),
    "Get": ("GetRequest", "GetReply"),
    "GetMany": ("GetManyRequest", "GetManyReply"),
    "Delete": ("DeleteRequest", "DeleteReply"),
    "List": ("ListRequest", "ListReply"),
    "Stat": ("StatRequest", "StatReply"),
}


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto that protoc makes from holder.proto."""
    fd = descriptor_pb2.FileDescriptorProto(name="holder.proto", package=PACKAGE, syntax="proto3")
    for name, fields in _MESSAGES.items():
        msg = fd.message_type.add(name=name)
        for fname, number, ftype, repeated, *type_name in fields:
            field = msg.field.add(
                name=fname,
                number=number,
                type=ftype,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
                json_name="".join(p if i == 0 else p.capitalize() for i, p in enumerate(fname.split("_"))),
            )
            if type_name:
                field.type_name = f".{PACKAGE}.{type_name[0]}"
    svc = fd.service.add(name=SERVICE)
    for rpc, (req, rep) in METHODS.items():
        svc.method.add(name=rpc, input_type=f".{PACKAGE}.{req}", output_type=f".{PACKAGE}.{rep}")
    return fd


# A private pool: nothing else in the process (Flower's own protos) can clash with these names.
_pool = descriptor_pool.DescriptorPool()
_pool.Add(file_descriptor())


def _cls(name: str) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
    return cls


PutRequest = _cls("PutRequest")
PutReply = _cls("PutReply")
PutManyRequest = _cls("PutManyRequest")
GetRequest = _cls("GetRequest")
GetReply = _cls("GetReply")
GetManyRequest = _cls("GetManyRequest")
FoundShare = _cls("FoundShare")
GetManyReply = _cls("GetManyReply")
DeleteRequest = _cls("DeleteRequest")
DeleteReply = _cls("DeleteReply")
ListRequest = _cls("ListRequest")
ListReply = _cls("ListReply")
StatRequest = _cls("StatRequest")
StatReply = _cls("StatReply")

MESSAGE_CLASSES = {name: globals()[name] for name in _MESSAGES}


def method_path(rpc: str) -> str:
    """The HTTP/2 path gRPC uses for an rpc of the service, e.g. /facefed.holder.v1.ShareHolder/Get."""
    return f"/{SERVICE_NAME}/{rpc}"
