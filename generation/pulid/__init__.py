"""PuLID-FLUX (Guo et al., "PuLID: Pure and Lightning ID Customization", 2024), written for diffusers.

- `face`: align a reference photo to the 512-px FFHQ template and keep the grey, parsed face.
- `bisenet`: BiSeNet face parsing (facexlib's weights).
- `eva_clip`: the EVA02-CLIP-L-14-336 vision tower.
- `encoders`: IDFormer (face embedding + EVA features → ID tokens) and the FLUX cross-attention.
- `id_encoder`: the whole face → ID tokens path, and how several references combine.
- `flux_hooks`: forward hooks that add the cross-attentions to diffusers' FluxTransformer2DModel.
- `weights`: strict loading of the released files, architectures read from tensor shapes.

The method itself (pipeline, parameters) is `generation.methods.pulid_flux.PulidFluxMethod`.
"""
