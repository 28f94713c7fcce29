"""Self-supervised objectives for ``adapt``: the source model's own loss (recipe section 2).

:mod:`~geoexplora.ssl.dinov2` (DINO + iBOT + KoLeo, EMA teacher, multi-crop),
:mod:`~geoexplora.ssl.mae` (masked autoencoding), :mod:`~geoexplora.ssl.augment` (multispectral
and temporal augmentation), :mod:`~geoexplora.ssl.heads` (the DINO/iBOT projection head).
"""
