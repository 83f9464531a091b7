"""The real-world suite: every file in ../shared/loras reads to the expected LoraDelta or is refused clearly.

One table: file -> (format, family, module count) for files that are LoRA deltas of a
known model, or the error code for layouts that are not (custom numbered factors
of ViT/SAM scripts, UniLoRA's single shared vector).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorasearch.errors import BadInput
from lorasearch.formats import load_lora

REAL = [
    ("Hareshjethani__BERT-GPT2-Multitask-Finetuning__adapter_model.safetensors", "peft", "llm:bert:768", 26, None),
    ("Haseebae__Synthetic_dataset_generator_with_stable_diffusion__pytorch_lora_weights.safetensors", "diffusers_legacy", "sd15", 128, None),
    ("Hirvita6__LoRA-flower-diffusion__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("IvanBy12__Imagenes__pytorch_lora_weights.safetensors", "diffusers_legacy", "sd2", 128, None),
    ("JamesQFreeman__LoRA-ViT__feb27.safetensors", None, None, None, "unsupported_layout"),
    ("JamesQFreeman__LoRA-ViT__lora.safetensors", None, None, None, "unsupported_layout"),
    ("JustinJiangNext__lora-2.0__pytorch_lora_weights.safetensors", "diffusers", "sd2", 128, None),
    ("Krishna4311__Cloud-LoRA-Object-Removal__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("Kuntya__Udacity__trainer_peft__adapter_model.safetensors", "peft", "llm:classifier:768", 4, None),
    ("MathieuNlp__Sam_LoRA__lora_weights__lora_rank16.safetensors", None, None, None, "unsupported_layout"),
    ("MathieuNlp__Sam_LoRA__lora_weights__lora_rank2.safetensors", None, None, None, "unsupported_layout"),
    ("MathieuNlp__Sam_LoRA__lora_weights__lora_rank8.safetensors", None, None, None, "unsupported_layout"),
    ("MuzammelMokhtar__HIGH-PERFORMANCE-INFERENCE-ENGINE-USING-QWEN-2.5__lora_adapter__adapter_model.safetensors", "peft", "llm:llama:896", 48, None),
    ("Riniii09__IAssignment2__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("Susana2306__Difusor__lora_model__adapter_model.safetensors", "peft", "sd15", 64, None),
    ("Tashu014__lora-imdb-distilbert__adapter_model.safetensors", "peft", "llm:distilbert:768", 16, None),
    ("abrhaleyarefaine1997__gpt2-tigrinya-lora__adapter_model__620b62ec.safetensors", "peft", "llm:gpt2:768", 36, None),
    ("abrhaleyarefaine1997__gpt2-tigrinya-lora__adapter_model__f9bbefc3.safetensors", "peft", "llm:gpt2:768", 36, None),
    ("akseljoonas__biotech-news-sentiment__lora_adapter__adapter_model.safetensors", "peft", "llm:encoder-layer:1024", 24, None),
    ("anirudh-ak__peft-gpt2__model__lora_model__adapter_model.safetensors", "peft", "llm:gpt2:768", 13, None),
    ("bbrokesoul__Text-to-Image-generator__lora_model__adapter_model.safetensors", "peft", "sd15", 64, None),
    ("catundchat__stable-diffusion-v1.5-lora__pytorch_lora_weights.safetensors", "diffusers_legacy", "sd15", 128, None),
    ("cloneofsimo__lora__example_loras__analog_svd_rank4.safetensors", "cloneofsimo", "sd15", 192, None),
    ("cloneofsimo__lora__example_loras__lora_disney.safetensors", "cloneofsimo", "sd15", 192, None),
    ("cloneofsimo__lora__example_loras__lora_disney_inpainting.safetensors", "cloneofsimo", "sd15", 192, None),
    ("dayanidhi04__emotion-classification-distilbert-lora__adapter_model.safetensors", "peft", "llm:distilbert:768", 16, None),
    ("filip131311__prject-dyfuzja-ml__lerned__dreambooth_lora_weights__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("filip131311__prject-dyfuzja-ml__lerned__dreambooth_lora_weights_enchanced__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("filip131311__prject-dyfuzja-ml__lora_weights__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("huduby__mind_control__lora_model__adapter_model.safetensors", "peft", "llm:roberta:768", 28, None),
    ("huggingface__diffusers__examples__text_to_image__sd-pokemon-model-lora__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("huggingface__peft__examples__monteclora_finetuning__monteclora-roberta-mrpc__checkpoint-230__adapter_model.safetensors", "peft", "llm:roberta:768", 28, None),
    ("huggingface__peft__examples__monteclora_finetuning__monteclora-roberta-mrpc__checkpoint-460__adapter_model.safetensors", "peft", "llm:roberta:768", 28, None),
    ("huggingface__peft__results_glue__adapter_ckpt__adapter_model.safetensors", None, None, None, "unsupported_layout"),
    ("ironhack-labs__lab-lora-tuning-peft__lora_exp_r4_a16_d0.05_e1__checkpoint-7__adapter_model.safetensors", "peft", "llm:gpt2:768", 36, None),
    ("ironhack-labs__lab-lora-tuning-peft__lora_exp_r4_a16_d0.1_e1__checkpoint-7__adapter_model.safetensors", "peft", "llm:gpt2:768", 36, None),
    ("ironhack-labs__lab-lora-tuning-peft__lora_exp_r4_a1_d0.05_e2__checkpoint-14__adapter_model.safetensors", "peft", "llm:gpt2:768", 36, None),
    ("ironhack-labs__lab-lora-tuning-peft__lora_model__adapter_model.safetensors", "peft", "llm:bloom:1024", 24, None),
    ("ironhack-labs__lab-lora-tuning-peft__peft_lab_outputs__checkpoint-14__adapter_model.safetensors", "peft", "llm:gpt2:2", 6, None),
    ("ironhack-labs__lab-lora-tuning-peft__peft_lab_outputs__checkpoint-35__adapter_model.safetensors", "peft", "llm:gptneo:768", 24, None),
    ("ironhack-labs__lab-lora-tuning-peft__training-output__lora_model__adapter_model.safetensors", "peft", "llm:bloom:1536", 24, None),
    ("jettooss__stable_diffusion_satellite_images__output_dir__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("jp4589-lang__Gen-AI-Group-Project__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("junnyontop-pixel__Why__outputs__adapter_model.safetensors", "peft", "llm:llama:896", 48, None),
    ("justbautista__fine-tuning__emotion__lora_model__adapter_model.safetensors", "peft", "llm:llama:2048", 44, None),
    ("justbautista__fine-tuning__therapist__lora_model__adapter_model.safetensors", "peft", "llm:llama:2048", 44, None),
    ("leighwoods__public-loras__lora.safetensors", "diffusers", "flux", 4, None),
    ("merkulovsvt__NLP__lora_model__adapter_model.safetensors", "peft", "llm:llama:2048", 32, None),
    ("mvclab-ntust-course__course3-B11115019__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("phuongsky__lora-gpt2-pipeline__outputs__adapter_model.safetensors", "peft", "llm:gpt2:768", 6, None),
    ("qwerty-aditya__rick_and_morty_LoRA__pytorch_lora_weights.safetensors", "diffusers_legacy", "sd15", 128, None),
    ("rafidreezwan__brain-mri-sd-lora-training__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("reddinft__sandmantales-hackathon__lora_weights__checkpoint-250__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("reddinft__sandmantales-hackathon__lora_weights__checkpoint-500__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("stathopoan__Apply-Lightweight-Fine-Tuning-to-a-Foundation-LLM-Model__lora_model__adapter_model.safetensors", "peft", "llm:gpt2:768", 13, None),
    ("timohavdk__sd-lora__2100-lora.safetensors", "diffusers", "sd15", 128, None),
    ("timohavdk__sd-lora__new.safetensors", "kohya", "sd15", 128, None),
    ("timohavdk__sd-lora__pytorch_lora_weights.safetensors", "diffusers", "sd15", 128, None),
    ("vfph55__my_lora__pytorch_lora_weights.safetensors", "diffusers", "sd2", 128, None),
    ("wellCh4n__pokemon-diffusers__pytorch_lora_weights.safetensors", "diffusers_legacy", "sd15", 128, None),
    ("whyiswmm__age_prediction__lora_model__adapter_model.safetensors", "peft", "llm:vit:768", 26, None),
    ("yasminesherbeny__DEPI-generative-AI-final-project__lora_model__adapter_model.safetensors", "peft", "llm:gpt2:768", 12, None),
    ("yasminesherbeny__DEPI-generative-AI-final-project__results__checkpoint-4186__adapter_model.safetensors", "peft", "llm:gpt2:768", 12, None),]


def test_table_covers_every_file(shared_loras: Path) -> None:
    on_disk = {p.name for p in shared_loras.glob("*.safetensors")}
    assert on_disk == {row[0] for row in REAL}


@pytest.mark.parametrize("name,fmt,family,modules,error", REAL, ids=[r[0][:60] for r in REAL])
def test_real_file(shared_loras: Path, name: str, fmt: str | None, family: str | None, modules: int | None,
                   error: str | None) -> None:
    path = shared_loras / name
    if error is not None:
        with pytest.raises(BadInput) as exc:
            load_lora(path)
        assert exc.value.code == error
        assert name in str(exc.value)
        return
    ld = load_lora(path)
    assert (ld.format, ld.family, len(ld.modules)) == (fmt, family, modules)
    assert ld.source["file_sha256"] and ld.source["autov3"]
    assert ld.weight_modules(), "at least one additive module"


def test_cli_info_over_the_whole_folder(shared_loras: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "lorasearch.cli", "info", str(shared_loras), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    ok = [r for r in rows if "error" not in r]
    refused = [r for r in rows if "error" in r]
    assert len(ok) == sum(1 for r in REAL if r[4] is None)
    assert len(refused) == sum(1 for r in REAL if r[4] is not None)
    for r in ok:
        for key in ("path", "format", "family", "modules", "rank", "dtype", "needs_base", "file_sha256", "autov3", "metadata"):
            assert key in r
    assert "Traceback" not in res.stderr
