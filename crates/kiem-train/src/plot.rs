//! The loss-curve PNG in the run directory.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::{Result, TrainError};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // The font is embedded, so registering cannot fail for want of a file.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws train loss (per step) and validation loss (per evaluation) against steps, and below
/// them, when the run scores benchmark tasks, each task's score (0..1) at each evaluation.
pub fn plot_losses(
    path: &Path,
    title: &str,
    train: &[(u64, f64)],
    val: &[(u64, f64)],
    tasks: &crate::trainer::TaskCurves,
) -> Result<()> {
    if train.is_empty() {
        return Ok(());
    }
    register_font();
    let tmp = path.with_extension("partial.png");
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let height = if tasks.is_empty() { 540 } else { 860 };
        let whole = BitMapBackend::new(&tmp, (960, height)).into_drawing_area();
        whole.fill(&WHITE)?;
        let (root, below) = whole.split_vertically(540);
        let max_step = train
            .iter()
            .chain(val)
            .chain(tasks.values().flatten())
            .map(|p| p.0)
            .max()
            .unwrap_or(1)
            .max(1);
        let finite = train
            .iter()
            .chain(val)
            .map(|p| p.1)
            .filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_step, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart.draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        if !tasks.is_empty() {
            let mut chart = ChartBuilder::on(&below)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0u64..max_step, 0f64..1f64)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("task score")
                .draw()?;
            for (i, (name, curve)) in tasks.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        curve.iter().copied(),
                        color.stroke_width(2),
                    ))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
                chart.draw_series(curve.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        whole.present()?;
        Ok(())
    };
    draw().map_err(|e| TrainError::Io(format!("cannot draw {}: {e}", path.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}
