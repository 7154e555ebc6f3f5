"""APO (Autonomous Preference Optimization) training for vision-language models.

Stage 1 bootstraps the student with SFT on all source trajectories; Stage 2 trains it to rank a consensus
positive above the drifting source trajectories with a multi-negative Plackett-Luce loss. Built on
transformers' Trainer, peft and accelerate (see ARCHITECTURE.md, "Training").

Modules: ``losses`` (pure torch, the Plackett-Luce loss), ``data`` (``load``, ``tokenize`` with the
truncation policy, ``collators``), ``config`` (``SFTStageConfig``, ``APOConfig``), ``trainer``
(``APOTrainer``, ``SFTStageTrainer``, ``run_sft``, ``run_apo``), ``modeling``, ``callbacks``,
``pipeline`` (what ``cxrmax train-apo`` runs; the caller supplies the preference rebuild, so this
package never imports cxrmax's data stages).

Not TRL's ``apo_zero`` / ``apo_down`` losses: those are Anchored Preference Optimization, a different
method with the same acronym.
"""
