"""Reports over the store: the efficiency metric and the study's tables (summary, efficiency, gap,
sensitivity). Figures and the HTML page build on these tables."""
from kanfarm.reports.efficiency import KNOWN_INTRINSIC_DIM, efficiency
from kanfarm.reports.tables import (REPORTS, efficiency_table, gap_table, overfit_onset, sensitivity_table,
                                    summary_table)

__all__ = ["KNOWN_INTRINSIC_DIM", "efficiency", "REPORTS", "efficiency_table", "gap_table", "overfit_onset",
           "sensitivity_table", "summary_table"]
