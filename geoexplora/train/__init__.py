"""Training: the Fabric loop shared by adapt and finetune (:mod:`geoexplora.train.engine`) and
the samplers that feed it from scenes or chips (:mod:`geoexplora.train.sampling`)."""
