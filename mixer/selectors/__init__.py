"""Selectors: keep the light ranker's top K, diversify authors, explore with logged propensities,
interleave two arms, cut the
page and its cursor."""

from mixer.selectors.author_diversity import AuthorDiversitySelector, author_discount
from mixer.selectors.exploration import ExplorationSelector
from mixer.selectors.interleaving import InterleavingSelector
from mixer.selectors.page import PageSelector
from mixer.selectors.page_cursor import CursorError, PageCursor
from mixer.selectors.top_k import TopKSelector

__all__ = ["AuthorDiversitySelector", "ExplorationSelector", "InterleavingSelector", "CursorError", "PageCursor", "PageSelector", "TopKSelector", "author_discount"]
