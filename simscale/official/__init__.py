"""`simscale import official`: the released SIM checkpoints (OpenGVLab/Siamese-Image-Modeling).

    reader.py    torch.load(weights_only=True) with a one-class allow-list; the `model` state dict
    names.py     official SiameseIMViT names -> simscale's SIM names, every tensor accounted for
    writer.py    a simscale checkpoint (step_N in RUN_DIR/checkpoints) that `simscale train` resumes
    finetune.py  a fine-tuned `models_vit` checkpoint -> a timm export (model.safetensors + config.json)
    cli.py       the command
"""
