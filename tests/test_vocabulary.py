"""The Python vocabulary (facepay/vocabulary.py) and the public contract's enums are one list.

Read from the generated descriptor of proto/facepay/v1/facepay.proto: a reason, decision or
enrollment status added on one side only fails here, before it can reach an event or a reply.
"""

from __future__ import annotations

import json

import msgpack
import pytest

from facepay.contract import pb, reason_code, reason_value
from facepay.vocabulary import Decision, EnrollmentStatus, Purpose, Reason


def proto_names(enum_descriptor) -> set[str]:
    """The enum's values as events carry them: lower-cased, without the proto3 zero value."""
    return {v.name.lower() for v in enum_descriptor.values if v.number != 0}


@pytest.mark.parametrize(
    ("python", "proto"),
    [
        (Reason, pb.DESCRIPTOR.enum_types_by_name["Reason"]),
        (Decision, pb.DESCRIPTOR.enum_types_by_name["Decision"]),
        (EnrollmentStatus, pb.EnrollResponse.DESCRIPTOR.enum_types_by_name["Status"]),
    ],
    ids=["Reason", "Decision", "EnrollResponse.Status"],
)
def test_the_python_vocabulary_equals_the_proto_enum(python, proto):
    assert {member.value for member in python} == proto_names(proto)
    assert all(member.name.lower() == member.value for member in python), "a member is named as its code"


def test_every_reason_converts_to_the_proto_value_and_back():
    for reason in Reason:
        assert reason_code(reason_value(reason)) == reason


def test_a_member_travels_as_its_bare_string():
    """Wire compatibility: events signed, messages encoded and strings read back are unchanged."""
    assert json.dumps({"decision": Decision.APPROVE, "reasons": [Reason.NO_FACE]}) == json.dumps(
        {"decision": "approve", "reasons": ["no_face"]}
    )
    assert msgpack.packb({"purpose": Purpose.ENROLL}) == msgpack.packb({"purpose": "enroll"})
    assert msgpack.unpackb(msgpack.packb(Reason.TIMEOUT)) == Reason.TIMEOUT
    assert f"{Reason.LOCKED_OUT}" == "locked_out"
