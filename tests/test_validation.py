"""Argument validation (vmserver.validation) on its own: checkers, disks, Schema."""

from __future__ import annotations

import pytest

from vmserver.errors import CommandError, ErrorCode
from vmserver.validation import (
    CPU_MAX,
    DISK_SIZE_MAX,
    DISKS_MAX,
    IDENT_MAX,
    PASSWORD_MAX,
    RAM_MAX,
    DiskSpec,
    InvalidArgs,
    Param,
    Schema,
    cpu,
    disk_size,
    disks,
    ident,
    password,
    ram,
)


def invalid(check, value, path: str) -> InvalidArgs:
    with pytest.raises(InvalidArgs) as info:
        check(value, path)
    err = info.value
    assert isinstance(err, CommandError)
    assert err.code is ErrorCode.INVALID_ARGS
    assert err.message == str(err)
    return err


def test_bounds_are_the_documented_ones():
    assert (IDENT_MAX, RAM_MAX, CPU_MAX, DISK_SIZE_MAX, DISKS_MAX, PASSWORD_MAX) == (
        64, 16777216, 4096, 1048576, 64, 1024)


# --- ident ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "a", "vm-1", "A.b_c:d-9", "0", "...", "-", "x" * 64, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-"[:64],
])
def test_ident_accepts(value):
    assert ident(value, "vm_id") == value


@pytest.mark.parametrize("value", [
    "", "x" * 65, "vm 1", "vm/1", "vm\n", "\nvm", "vm\t1", "v\u00e9", "vm\u00b2", "\u0661", "a,b", "a*", "vm@x",
    "a\x00",
])
def test_ident_rejects_bad_strings(value):
    err = invalid(ident, value, "vm_id")
    assert err.arg == "vm_id"
    assert err.message.startswith("vm_id: must be a string of 1 to 64 characters from [A-Za-z0-9._:-], got ")


@pytest.mark.parametrize("value, shown", [
    (5, "5"), (None, "null"), (True, "true"), (1.5, "1.5"), (["a"], "an array"), ({"a": 1}, "an object"),
    (b"vm", "bytes"),
])
def test_ident_rejects_non_strings(value, shown):
    err = invalid(ident, value, "disk_id")
    assert err.arg == "disk_id"
    assert err.message.endswith(f", got {shown}")


def test_ident_message_shows_short_value_and_summarises_long_one():
    assert invalid(ident, "vm 1", "vm_id").message.endswith(", got 'vm 1'")
    assert invalid(ident, "y" * 500, "vm_id").message.endswith(", got a string of 500 characters")


# --- integers -------------------------------------------------------------------------------


@pytest.mark.parametrize("check, name, high", [(ram, "ram", RAM_MAX), (cpu, "cpu", CPU_MAX),
                                               (disk_size, "size", DISK_SIZE_MAX)])
def test_int_bounds_inclusive(check, name, high):
    assert check(1, name) == 1
    assert check(high, name) == high
    result = check(high - 1, name)
    assert result == high - 1 and type(result) is int


@pytest.mark.parametrize("check, name, high", [(ram, "ram", RAM_MAX), (cpu, "cpu", CPU_MAX),
                                               (disk_size, "size", DISK_SIZE_MAX)])
@pytest.mark.parametrize("value_of", [
    lambda high: True, lambda high: False, lambda high: 2048.0, lambda high: 1.0, lambda high: 0,
    lambda high: -1, lambda high: -(10**30), lambda high: high + 1, lambda high: 10**30,
    lambda high: "2048", lambda high: None, lambda high: [1], lambda high: {"v": 1},
])
def test_int_rejects(check, name, high, value_of):
    value = value_of(high)
    err = invalid(check, value, name)
    assert err.arg == name
    assert err.message.startswith(f"{name}: must be an integer from 1 to {high}, got ")


def test_int_messages_show_the_value():
    assert invalid(ram, True, "ram").message == f"ram: must be an integer from 1 to {RAM_MAX}, got true"
    assert invalid(ram, 2048.0, "ram").message == f"ram: must be an integer from 1 to {RAM_MAX}, got 2048.0"
    assert invalid(cpu, 0, "cpu").message == f"cpu: must be an integer from 1 to {CPU_MAX}, got 0"
    assert invalid(cpu, 10**30, "cpu").message == f"cpu: must be an integer from 1 to {CPU_MAX}, got {10**30}"
    assert invalid(cpu, 10**60, "cpu").message.endswith("got an integer of 61 digits")


# --- password --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["x", "correct horse battery staple", "p" * PASSWORD_MAX, "p\u00e9\U0001f600",
                                   " leading and trailing "])
def test_password_accepts(value):
    assert password(value, "password") == value


SECRETS = ["hunter2-" + "s" * (PASSWORD_MAX - 7), "\ud800", "ab\udfffcd-secret"]


@pytest.mark.parametrize("value, expected", [
    ("", f"password: must be a string of 1 to {PASSWORD_MAX} characters, got string"),
    ("hunter2-" + "s" * (PASSWORD_MAX - 7), f"password: must be a string of 1 to {PASSWORD_MAX} characters, got string"),
    (12345678, f"password: must be a string of 1 to {PASSWORD_MAX} characters, got integer"),
    (None, f"password: must be a string of 1 to {PASSWORD_MAX} characters, got null"),
    (["hunter2"], f"password: must be a string of 1 to {PASSWORD_MAX} characters, got array"),
    ("\ud800", "password: must be valid Unicode text (no lone surrogates)"),
    ("ab\udfffcd-secret", "password: must be valid Unicode text (no lone surrogates)"),
])
def test_password_rejects_without_echoing_it(value, expected):
    err = invalid(password, value, "password")
    assert err.arg == "password"
    assert err.message == expected
    if isinstance(value, str) and value:
        assert value not in err.message
        assert "hunter2" not in err.message and "secret" not in err.message
    assert "12345678" not in err.message


# --- disks -------------------------------------------------------------------------------------


def test_disks_accepts_and_converts():
    out = disks([{"disk_id": "d1", "size": 10}, {"size": DISK_SIZE_MAX, "disk_id": "d-2"}], "disks")
    assert out == (DiskSpec("d1", 10), DiskSpec("d-2", DISK_SIZE_MAX))
    assert isinstance(out, tuple)


def test_disks_empty_and_max():
    assert disks([], "disks") == ()
    many = [{"disk_id": f"d{i}", "size": 1} for i in range(DISKS_MAX)]
    assert len(disks(many, "disks")) == DISKS_MAX


@pytest.mark.parametrize("value, shown", [
    ({"disk_id": "d1", "size": 1}, "an object"), ("d1", "'d1'"), (None, "null"), (3, "3"),
    (("d1", 1), "tuple"),
])
def test_disks_not_a_list(value, shown):
    err = invalid(disks, value, "disks")
    assert err.arg == "disks"
    assert err.message == f"disks: must be an array of at most {DISKS_MAX} disk objects, got {shown}"


def test_disks_too_many():
    many = [{"disk_id": f"d{i}", "size": 1} for i in range(DISKS_MAX + 1)]
    err = invalid(disks, many, "disks")
    assert err.arg == "disks"
    assert err.message == f"disks: at most {DISKS_MAX} disks, got {DISKS_MAX + 1}"


@pytest.mark.parametrize("item, shown", [("d1", "'d1'"), (["d1", 1], "an array"), (None, "null"), (7, "7")])
def test_disks_item_not_an_object(item, shown):
    err = invalid(disks, [{"disk_id": "ok", "size": 1}, item], "disks")
    assert err.arg == "disks"
    assert err.message == f'disks[1]: must be an object {{"disk_id": ..., "size": ...}}, got {shown}'


def test_disks_unknown_field():
    err = invalid(disks, [{"disk_id": "d1", "size": 1, "type": "ssd"}], "disks")
    assert err.arg == "disks"
    assert err.message == "disks[0]: unknown field 'type' (allowed: disk_id, size)"


@pytest.mark.parametrize("item, missing", [({"size": 1}, "disk_id"), ({"disk_id": "d"}, "size"), ({}, "disk_id")])
def test_disks_missing_field(item, missing):
    err = invalid(disks, [{"disk_id": "a", "size": 1}, {"disk_id": "b", "size": 1}, item], "disks")
    assert err.arg == "disks"
    assert err.message == f"disks[2].{missing}: missing"


def test_disks_nested_size_error_path():
    err = invalid(disks, [{"disk_id": "a", "size": 1}, {"disk_id": "b", "size": 0}], "disks")
    assert err.arg == "disks"
    assert err.message == f"disks[1].size: must be an integer from 1 to {DISK_SIZE_MAX}, got 0"


@pytest.mark.parametrize("size", [True, 2.0, DISK_SIZE_MAX + 1, -5, "10"])
def test_disks_nested_size_bad_types(size):
    err = invalid(disks, [{"disk_id": "a", "size": 1}, {"disk_id": "b", "size": size}], "disks")
    assert err.arg == "disks"
    assert err.message.startswith("disks[1].size: must be an integer from 1 to ")


def test_disks_nested_disk_id_error_path():
    err = invalid(disks, [{"disk_id": "has space", "size": 1}], "disks")
    assert err.arg == "disks"
    assert err.message.startswith('disks[0].disk_id: must be a string of 1 to 64 characters')
    assert err.message.endswith("got 'has space'")


def test_disks_first_error_wins():
    err = invalid(disks, [{"disk_id": "", "size": 0}, {"bogus": 1}], "disks")
    assert err.message.startswith("disks[0].disk_id:")


def test_disks_with_a_different_path_names_that_argument():
    err = invalid(disks, [{"disk_id": "a", "size": 0}], "extra_disks")
    assert err.arg == "extra_disks"
    assert err.message.startswith("extra_disks[0].size:")


# --- Schema -------------------------------------------------------------------------------------

SCHEMA = Schema(
    Param("vm_id", ident, True, "the VM"),
    Param("ram", ram, True, "MiB"),
    Param("cpu", cpu, False, "cores"),
    Param("disks", disks, False, "disks"),
    Param("password", password, False, "secret"),
)


def schema_error(args: dict) -> InvalidArgs:
    with pytest.raises(InvalidArgs) as info:
        SCHEMA.validate("add_vm", args)
    assert info.value.code is ErrorCode.INVALID_ARGS
    return info.value


def test_schema_names_in_order():
    assert SCHEMA.names() == ["vm_id", "ram", "cpu", "disks", "password"]


def test_schema_validate_converts_and_leaves_out_absent_optionals():
    out = SCHEMA.validate("add_vm", {"ram": 512, "vm_id": "vm-1", "disks": [{"disk_id": "d", "size": 3}]})
    assert out == {"vm_id": "vm-1", "ram": 512, "disks": (DiskSpec("d", 3),)}
    assert "cpu" not in out and "password" not in out


def test_schema_validate_all_arguments():
    out = SCHEMA.validate("add_vm", {"vm_id": "v", "ram": 1, "cpu": 2, "disks": [], "password": "pw"})
    assert out == {"vm_id": "v", "ram": 1, "cpu": 2, "disks": (), "password": "pw"}


def test_schema_unknown_argument_is_named():
    err = schema_error({"vm_id": "v", "ram": 1, "colour": "red"})
    assert err.arg == "colour"
    assert err.message == "unknown argument 'colour' for add_vm (allowed: vm_id, ram, cpu, disks, password)"


def test_schema_unknown_argument_reported_before_bad_values():
    err = schema_error({"vm_id": 5, "ram": 0, "zz": 1})
    assert err.arg == "zz"


def test_schema_missing_required_is_named():
    err = schema_error({"vm_id": "v", "cpu": 1})
    assert err.arg == "ram"
    assert err.message == "ram: missing (required by add_vm)"


def test_schema_missing_with_no_arguments_names_the_first_required():
    err = schema_error({})
    assert err.arg == "vm_id"
    assert err.message == "vm_id: missing (required by add_vm)"


def test_schema_bad_value_names_the_argument():
    err = schema_error({"vm_id": "v", "ram": 1, "cpu": True})
    assert err.arg == "cpu"
    assert err.message == f"cpu: must be an integer from 1 to {CPU_MAX}, got true"


def test_schema_null_is_not_a_value_for_an_optional_argument():
    err = schema_error({"vm_id": "v", "ram": 1, "cpu": None})
    assert err.arg == "cpu"
    assert err.message.endswith("got null")


def test_schema_nested_disk_error_names_disks():
    err = schema_error({"vm_id": "v", "ram": 1, "disks": [{"disk_id": "a", "size": 1}, {"disk_id": "b"}]})
    assert err.arg == "disks"
    assert err.message == "disks[1].size: missing"


def test_schema_without_params():
    empty = Schema()
    assert empty.validate("health", {}) == {}
    with pytest.raises(InvalidArgs) as info:
        empty.validate("health", {"x": 1})
    assert info.value.arg == "x"
    assert info.value.message == "unknown argument 'x' for health (allowed: none)"


def test_schema_all_optional_accepts_empty():
    opt = Schema(Param("cpu", cpu, False, ""))
    assert opt.validate("c", {}) == {}
    assert opt.validate("c", {"cpu": 4}) == {"cpu": 4}
