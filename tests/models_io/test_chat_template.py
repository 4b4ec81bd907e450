"""models.chat_template renders exactly what transformers' apply_chat_template renders."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from models.chat_template import ChatTemplateError, compile_template, render_chat
from models.tokenizer import TokenizerBundle

from .conftest import CONVERSATIONS

# Uses what real templates use: loop variables, namespace, tojson, raise_exception,
# loopcontrols, whitespace control, and special tokens as variables.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- continue -%}{%- endif -%}
  {%- if m['role'] not in ['user', 'assistant'] -%}
    {{- raise_exception('bad role ' + m['role']) -}}
  {%- endif -%}
  {% if loop.previtem is defined and loop.previtem['role'] == 'system' %}[SYS] {{ ns.system }}
{% endif %}
  [{{ m['role'] | upper }}#{{ loop.index }} ({{ m | length }} keys)] {{ m['content'] | trim }}
  {%- if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}
  {%- if m.get('meta') is not none %} {{ m['meta'] | tojson }}{% endif %}

{% endfor -%}
{%- if add_generation_prompt %}[ASSISTANT#{{ messages | length + 1 }}]{% endif -%}
"""


def _reference(template: str, bos: str | None = "<s>", eos: str | None = "</s>"):
    """A transformers tokenizer with this template and special tokens (the reference renderer)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE()), bos_token=bos, eos_token=eos
    )
    ref.chat_template = template
    return ref


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tiny_checkpoint_templates_match_transformers(
    tiny_checkpoints, kind, add_generation_prompt
):
    folder = tiny_checkpoints[kind]
    ours, ref = TokenizerBundle.from_hf_folder(folder), AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        expected = ref.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rich_template_matches_transformers(add_generation_prompt):
    ref = _reference(RICH_TEMPLATE)
    conversations = [
        *CONVERSATIONS,
        [{"role": "user", "content": "  padded  ", "meta": {"ünï": [1, "ç"], "n": None}}],
        [{"role": "user", "content": "dropped None key", "meta": None}],
    ]
    for messages in conversations:
        expected = ref.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        got = render_chat(
            RICH_TEMPLATE,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token="<s>",
            eos_token="</s>",
        )
        assert got == expected
        assert got.startswith("<s>")


def test_missing_special_tokens_stay_undefined_like_transformers():
    template = "{{ bos_token is defined }}|{% for m in messages %}{{ m.content }}{% endfor %}"
    messages = [{"role": "user", "content": "x"}]
    expected = _reference(template, bos=None, eos=None).apply_chat_template(
        messages, tokenize=False
    )
    got = render_chat(
        template, messages, add_generation_prompt=False, bos_token=None, eos_token=None
    )
    assert got == expected == "False|x"


def test_unk_and_pad_tokens_reach_the_template_when_set():
    template = "{{ pad_token }}|{{ unk_token is defined }}|{{ messages[0].content }}"
    messages = [{"role": "user", "content": "x"}]
    specials = dict(bos_token=None, eos_token=None, pad_token="<pad>", unk_token=None)
    got = render_chat(template, messages, add_generation_prompt=False, **specials)
    assert got == "<pad>|False|x"


def test_extra_variables_reach_the_template():
    template = "{{ greeting }}, {{ messages[0].content }}{% if add_generation_prompt %}!{% endif %}"
    messages = [{"role": "user", "content": "world"}]
    out = render_chat(
        template,
        messages,
        add_generation_prompt=True,
        bos_token=None,
        eos_token=None,
        greeting="hi",
    )
    assert out == "hi, world!"


def test_raise_exception_is_a_one_line_value_error():
    template = (
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Conversation must\\nstart with user') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="Conversation must start with user") as info:
        render_chat(
            template,
            [{"role": "assistant", "content": "x"}],
            add_generation_prompt=True,
            bos_token=None,
            eos_token=None,
        )
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="line 2") as info:
        compile_template("ok\n{% for m in messages %}{{ m.content }}\n")
    assert "\n" not in str(info.value)


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(ChatTemplateError):
        render_chat(
            "{{ messages.__class__.__mro__[1].__subclasses__() }}",
            [],
            add_generation_prompt=False,
            bos_token=None,
            eos_token=None,
        )
    with pytest.raises(ChatTemplateError):
        render_chat(
            "{% set ns = namespace() %}{% set ns._x = 1 %}",
            [],
            add_generation_prompt=False,
            bos_token=None,
            eos_token=None,
        )


def test_templates_are_compiled_once():
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert compile_template(template) is compile_template(template)


def test_generation_tag_renders_its_body():
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}"
    )
    messages = CONVERSATIONS[2]
    expected = _reference(template).apply_chat_template(messages, tokenize=False)
    got = render_chat(
        template, messages, add_generation_prompt=False, bos_token="<s>", eos_token="</s>"
    )
    assert got == expected
