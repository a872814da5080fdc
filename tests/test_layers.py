import pytest

from sra_plugin.layers import resolve_layer


@pytest.mark.parametrize(
    "spec, depth, block",
    [(8, 28, 8), (-1, 28, 28), (-28, 28, 1), (0.3, 28, 8), (0.7, 28, 20), (0.25, 12, 3), (2 / 3, 12, 8), (0.01, 12, 1)],
)
def test_specs_resolve_to_one_based_blocks(spec, depth, block):
    assert resolve_layer(spec, depth) == block


@pytest.mark.parametrize("spec", [0, 29, -29, 0.0, 1.0, 1.5, -0.2, float("nan"), 8.0])
def test_out_of_range_specs_raise_value_error_naming_the_argument(spec):
    with pytest.raises(ValueError, match=r"student_layer="):
        resolve_layer(spec, 28, "student_layer")


@pytest.mark.parametrize("spec", ["8", None, True, [8]])
def test_non_numeric_specs_raise_type_error(spec):
    with pytest.raises(TypeError, match=r"teacher_layer="):
        resolve_layer(spec, 28, "teacher_layer")
