"""The dataset card: streaming summaries of a scores folder (measure, sketch), plots and the README with
its Hugging Face YAML header (plots, render); :func:`pipeline.card.build.build_card` puts them together."""
