"""The chain's visual report (:func:`report`): chain graph, images and predictions, SMOE maps,
activation maximisation, inference chains, metrics and analyses, in one self-contained HTML
page. Parts: :mod:`.chain_graph` / :mod:`.chain_svg` (architecture), :mod:`.smoe`,
:mod:`.actmax`, :mod:`.pictures`, :mod:`.html`, :mod:`.sections`, :mod:`.build`."""

from nchains.report.build import report

__all__ = ["report"]
