"""Every float field of a chat completion request reaches Triton as FP32, so the API refuses values
that are not finite in float32 (1e39 is FP32 inf) and names the field (issue 29, item 2)."""

from __future__ import annotations

import numpy as np
import pytest

from openai_api.errors import APIError
from openai_api.inputs import check_values
from openai_api.schema import ChatCompletionRequest

FLOAT_FIELDS = [name for name, field in ChatCompletionRequest.model_fields.items() if field.annotation in (float, float | None)]
FP32_MAX = float(np.finfo(np.float32).max)


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Hi"}], **fields)


def test_the_schema_has_the_float_fields_triton_takes_as_fp32():
    assert set(FLOAT_FIELDS) == {"temperature", "top_p", "repetition_penalty"}


@pytest.mark.parametrize("value", [1e39, -1e39, 3.5e38, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_float_fields_outside_float32_are_400_naming_the_field(field, value):
    with pytest.raises(APIError) as error:
        check_values(_request(**{field: value}))
    assert (error.value.status, error.value.param) == (400, field)
    assert error.value.message.startswith(field)


def test_the_largest_float32_temperature_is_accepted():
    check_values(_request(temperature=FP32_MAX))
