"""SIM on timm ViTs: position embeddings, online/target encoders, projector and predictor."""
