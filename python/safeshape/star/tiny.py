"""A tiny random guard for tests, benchmarks and demos: a small LlamaForCausalLM, a byte-level BPE tokenizer
trained in memory, and a chat template shaped like Llama Guard 3's (a long policy head, the conversation, then the
assessment instructions and the assistant header; the guard would write "\\n\\nsafe" or "\\n\\nunsafe").

Everything is built locally in seconds; nothing is downloaded. The model is random: its verdicts mean nothing, but
its logits depend on every token it attends to, which is what parity tests need."""
from __future__ import annotations

import json
import random

import torch

CATEGORIES = [
    ("Violent Crimes", "Responses that enable, encourage, or endorse violent crimes such as terrorism, murder, "
     "assault, kidnapping and animal abuse."),
    ("Non-Violent Crimes", "Responses that enable, encourage, or endorse fraud, scams, theft, arson, drug crimes, "
     "weapons crimes and hacking."),
    ("Sex-Related Crimes", "Responses that enable, encourage, or endorse sex trafficking, sexual assault or "
     "harassment."),
    ("Child Sexual Exploitation", "Responses that describe, enable, encourage, or endorse the abuse of children."),
    ("Defamation", "Responses that are both verifiably false and likely to injure a living person's reputation."),
    ("Specialized Advice", "Responses that contain specialized financial, medical, or legal advice."),
    ("Privacy", "Responses that contain sensitive, nonpublic personal information."),
    ("Intellectual Property", "Responses that may violate the intellectual property rights of any third party."),
    ("Indiscriminate Weapons", "Responses that enable the creation of chemical, biological, radiological or "
     "nuclear weapons."),
    ("Hate", "Responses that demean or dehumanize people on the basis of their sensitive, personal "
     "characteristics."),
    ("Suicide and Self-Harm", "Responses that enable, encourage, or endorse acts of intentional self-harm."),
    ("Sexual Content", "Responses that contain erotica."),
    ("Elections", "Responses that contain factually incorrect information about voting in civic elections."),
    ("Code Interpreter Abuse", "Responses that seek to abuse code interpreters."),
]

POLICY = "".join(f"S{i}: {name}.\n{text}\n" for i, (name, text) in enumerate(CATEGORIES, 1))

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Resembles Llama Guard 3's template: policy head, "User: ..."/"Agent: ..." turns (contents trimmed), then the
# instructions and the assistant header; the verdict follows a blank line.
CHAT_TEMPLATE = (
    "{%- set role = 'Agent' if messages[-1]['role'] == 'assistant' else 'User' -%}"
    "{{- bos_token + '<|start_header_id|>user<|end_header_id|>\\n\\nTask: Check if there is unsafe content in \\'' + "
    "role + '\\' messages in conversations according our safety policy with the below categories.\\n\\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\\n' + policy + '<END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>"
    "\\n\\n' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set r = 'User' -%}{%- else -%}{%- set r = 'Agent' -%}{%- endif -%}"
    "{{- r + ': ' + message['content'] | trim + '\\n\\n' -}}"
    "{%- endfor -%}"
    "{{- '<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST ' + role + ' message in the above "
    "conversation:\\n - First line must read \\'safe\\' or \\'unsafe\\'.\\n - If unsafe, a second line must "
    "include a comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>' -}}"
)

WORDS = ("the a an of to and in is it that for on with as was at by this be from or have not are but they you "
         "what how can will would should could if then there their them about which when make like time just know "
         "take people into year your good some other see only come its over think also back after use two way "
         "first well even new want because any these give day most us safe unsafe help please sure here steps "
         "step you'll need first, second, finally. however, cannot can't I'm sorry, assist with request. "
         "instructions: recipe water heat mix wait carefully! question? answer: 1. 2. 3. code print(x) return "
         "value; data file network account password bank money market price plan build tool chemical mixture "
         "bottle fire door lock key computer phone email message letter story poem song history science math "
         "lesson teacher student school garden flower tree river mountain city street car bus train").split()


def _full_template() -> str:
    return "{%- set policy = " + json.dumps(POLICY) + " -%}" + CHAT_TEMPLATE


def random_text(n_words: int, seed: int = 0) -> str:
    """n_words pseudo-English words with punctuation and the odd line break (deterministic for a seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(rng.choice(WORDS))
        if i + 1 < n_words:
            out.append("\n\n" if rng.random() < 0.04 else ("\n" if rng.random() < 0.03 else " "))
    return "".join(out)


def build_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style pre-tokenization) trained in memory, with the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [POLICY, CHAT_TEMPLATE] + [random_text(200, seed=s) for s in range(20)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    fast.chat_template = _full_template()
    return fast


def build_model(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                seed: int = 0, attn_implementation: str = "sdpa", max_positions: int = 8192):
    """A random LlamaForCausalLM (grouped-query attention, RoPE), in eval mode. Weights are drawn wider than a
    trained model's so that logits depend visibly on every token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, initializer_range=0.2, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=4)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def build_tiny_guard(hidden: int = 64, layers: int = 2, seed: int = 0, attn_implementation: str = "sdpa",
                     vocab_size: int = 2048):
    """(model, tokenizer) of a tiny random guard whose template resembles Llama Guard 3's (preset llama-guard-3)."""
    tokenizer = build_tokenizer(vocab_size)
    model = build_model(len(tokenizer), hidden=hidden, layers=layers, seed=seed,
                        attn_implementation=attn_implementation)
    return model, tokenizer


def save_tiny_guard(path, **kwargs) -> None:
    """Write a tiny guard (model + tokenizer with its chat template) to a local folder that load_guard reads."""
    model, tokenizer = build_tiny_guard(**kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
