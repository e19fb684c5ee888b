"""Chat messages (OpenAI and Hugging Face shapes) to an image and a Conversation."""

import pytest
from vpt_cases import rand_image

from vpt_fast import spec
from vpt_fast.chat import from_messages, with_trigger
from vpt_fast.prompt import Conversation


def test_openai_and_hugging_face_shapes():
    image = rand_image(20, 20)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                {"role": "user", "content": [{"type": "text", "text": "Look "}, {"type": "image", "image": image},
                                             {"type": "text", "text": " here."}]}]
    found, chat = from_messages(messages)
    assert found == [image]
    assert chat == Conversation((("user", "Hi"), ("assistant", "Hello."), ("user", "Look <image> here.")),
                                system="Be brief.\nNo lists.")
    found, chat = from_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}],
                                resolve_image=lambda url: ("resolved", url))
    assert found == [("resolved", "data:x")] and chat.turns == (("user", "<image>"),)
    assert chat.system == spec.SYSTEM_PROMPT
    found, chat = from_messages([{"role": "user", "content": "Q?"}], mode="region")
    assert found == [] and chat.turns[-1][1] == f"Q? {spec.REGION_TRIGGER}."
    assert with_trigger("Q? ", "reencode") == f"Q? {spec.REENCODE_TRIGGER}." and with_trigger("Q", "free") == "Q"


@pytest.mark.parametrize("messages,message", [
    ([], "non-empty list"),
    ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
    ([{"role": "user"}], "message 0: the content is missing"),
    ([{"role": "user", "content": 3}], "content must be a string or a list of parts"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unknown part type 'audio'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "a text part needs a string 'text'"),
    ([{"role": "user", "content": "see <image>"}], "send the image as an image part"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "needs {'image_url': {'url'"),
    ([{"role": "assistant", "content": [{"type": "image", "image": 1}]}, {"role": "user", "content": "q"}],
     "only user messages may carry an image"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "a system message must come before"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "the last message must be the user's"),
])
def test_errors_name_the_message(messages, message):
    with pytest.raises(ValueError, match=message):
        from_messages(messages)


def test_several_images_in_any_user_turn_in_order():
    a, b, c = rand_image(20, 20, 1), rand_image(24, 20, 2), rand_image(20, 28, 3)
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "and "},
                                             {"type": "image_url", "image_url": {"url": "data:b"}}]},
                {"role": "assistant", "content": "Two."},
                {"role": "user", "content": [{"type": "text", "text": "Now "}, {"type": "image", "image": c},
                                             {"type": "text", "text": " too?"}]}]
    found, chat = from_messages(messages, resolve_image=lambda x: b if x == "data:b" else x)
    assert found == [a, b, c]
    assert chat.turns == (("user", "<image>and <image>"), ("assistant", "Two."), ("user", "Now <image> too?"))
    assert from_messages(messages, max_images=3)[0] == [a, "data:b", c]
    with pytest.raises(ValueError, match=r"message 2, part 1: at most 2 image\(s\) may be given in one prompt"):
        from_messages(messages, max_images=2, resolve_image=lambda x: pytest.fail("resolved before the limit"))


def test_unknown_mode():
    with pytest.raises(ValueError, match="the VPT mode must be one of"):
        from_messages([{"role": "user", "content": "q"}], mode="zoom")
