//! The search ladder, written once: a coordinate is asked at the import's first
//! radius, then at its maximum radius, then with widesearch (20 km), and is
//! `no_match` when the last stage it may try finds nothing (DESIGN.md
//! "Enrichment rules"). The settings are the import's [`SearchPlan`].
//!
//! The stages ([`Stage`], as the store keeps them): [`Stage::Radius`],
//! [`Stage::MaxRadius`] (skipped when it is not larger than the first, both clamped
//! to postcodes.io's 2000 m), [`Stage::Widesearch`] (skipped when the import turns it
//! off).
//!
//! A provider that answers in memory climbs a batch's whole ladder at once
//! ([`climb`]). One that is asked by request climbs one stage a request: the
//! enricher saves a coordinate's [`Step::Next`] as pending at that stage and
//! claims batches stage by stage ([`stage_to_claim`]), so that a widened
//! search goes out with others of its stage, in full batches when there are
//! enough.

use std::future::Future;

use crate::{
    geo::LatLon,
    lookup::{Match, Radius, SearchPlan, MAX_API_RADIUS_M},
    model::Stage,
    provider::{Answer, Provider},
    store::{Claimed, Outcome, Saved},
};

/// Where an answer at one stage leaves its coordinate.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // mostly `Found`: boxing would only add an allocation
pub enum Step {
    /// A postcode in range: the coordinate is enriched.
    Found(Match),
    /// Nothing in range: ask again at this later stage.
    Next(Stage),
    /// Nothing in range at the last stage it may try.
    NoMatch,
}

impl SearchPlan {
    /// The radius of a stage.
    pub fn radius(&self, stage: Stage) -> Radius {
        match stage {
            Stage::Radius => Radius::Metres(self.radius_m),
            Stage::MaxRadius => Radius::Metres(self.max_radius_m),
            Stage::Widesearch => Radius::Widesearch,
        }
    }

    /// The stage to try after `stage` found nothing, `None` when the row is
    /// `no_match`. The maximum radius is skipped when it searches no further
    /// than the first (both clamped to postcodes.io's 2000 m).
    pub fn next_stage(&self, stage: Stage) -> Option<Stage> {
        let widesearch = self.widesearch.then_some(Stage::Widesearch);
        match stage {
            Stage::Radius
                if self.max_radius_m.min(MAX_API_RADIUS_M) > self.radius_m.min(MAX_API_RADIUS_M) =>
            {
                Some(Stage::MaxRadius)
            }
            Stage::Radius | Stage::MaxRadius => widesearch,
            Stage::Widesearch => None,
        }
    }

    /// Where the answer `found` at `stage` leaves a coordinate.
    pub fn step(&self, stage: Stage, found: Option<Match>) -> Step {
        match found {
            Some(m) => Step::Found(m),
            None => self.next_stage(stage).map_or(Step::NoMatch, Step::Next),
        }
    }
}

impl From<Step> for Outcome {
    /// What the store keeps of a step: a later stage is a pending lookup at that stage.
    fn from(step: Step) -> Self {
        match step {
            Step::Found(m) => Outcome::Enriched(m),
            Step::Next(stage) => Outcome::NextStage(stage),
            Step::NoMatch => Outcome::NoMatch,
        }
    }
}

/// Answers claimed coordinates, each from its own stage, through the whole
/// ladder at once: stage by stage, each stage's coordinates asked together.
/// For a provider that [answers locally](Provider::answers_locally): no quota
/// and no retries, so an error or a coordinate left out of an answer fails it.
pub async fn climb(provider: &dyn Provider, plan: &SearchPlan, items: &[Claimed]) -> Vec<Saved> {
    let mut stage: Vec<Option<Stage>> = items.iter().map(|c| Some(c.stage)).collect();
    let mut outcome: Vec<Outcome> = vec![Outcome::NoMatch; items.len()];
    // Stages only move forward (`next_stage` > the stage, or none): the loop ends.
    while let Some(s) = stage.iter().flatten().min().copied() {
        let asked: Vec<usize> = (0..items.len()).filter(|&i| stage[i] == Some(s)).collect();
        let ats: Vec<LatLon> = asked
            .iter()
            .map(|&i| LatLon {
                lat: items[i].lat,
                lon: items[i].lon,
            })
            .collect();
        let mut answers = match provider.answer(&ats, plan.radius(s)).await {
            Ok(answers) => answers.into_iter(),
            Err(e) => {
                for &i in &asked {
                    (stage[i], outcome[i]) = (None, Outcome::Failed(e.to_string()));
                }
                continue;
            }
        };
        for &i in &asked {
            let step = match answers.next() {
                Some(Answer::Found(m)) => plan.step(s, Some(m)),
                Some(Answer::NoPostcode) => plan.step(s, None),
                Some(Answer::Missing) | None => {
                    (stage[i], outcome[i]) = (None, Outcome::Failed("not in the provider's answer".into()));
                    continue;
                }
            };
            match step {
                Step::Next(next) => stage[i] = Some(next),
                done => (stage[i], outcome[i]) = (None, done.into()),
            }
        }
    }
    items
        .iter()
        .zip(outcome)
        .map(|(c, outcome)| Saved {
            lat: c.lat,
            lon: c.lon,
            attempts: c.attempts,
            outcome,
        })
        .collect()
}

/// The stage whose pending coordinates the enricher claims next, `None` when
/// nothing is pending: a full batch of a later stage first (widesearch first),
/// then the first radius, then what is left of later stages.
/// `pending(stage, cap)` counts a stage's pending coordinates, up to `cap`.
pub async fn stage_to_claim<F, Fut>(batch: i64, pending: F) -> anyhow::Result<Option<Stage>>
where
    F: Fn(Stage, i64) -> Fut,
    Fut: Future<Output = anyhow::Result<i64>>,
{
    for s in [Stage::Widesearch, Stage::MaxRadius] {
        if pending(s, batch).await? >= batch {
            return Ok(Some(s));
        }
    }
    for s in Stage::ALL {
        if pending(s, 1).await? > 0 {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::future::BoxFuture;

    use super::*;
    use crate::{lookup::Area, provider::CallError};

    /// Coordinate `lat` has its postcode `lat` km away (none when negative);
    /// records every question as (radius in metres, coordinates asked).
    struct Distances {
        asked: Mutex<Vec<(f64, usize)>>,
    }

    impl Provider for Distances {
        fn name(&self) -> String {
            "distances".into()
        }

        fn batch_size(&self) -> usize {
            10
        }

        fn answers_locally(&self) -> bool {
            true
        }

        fn answer<'a>(
            &'a self,
            at: &'a [LatLon],
            radius: Radius,
        ) -> BoxFuture<'a, Result<Vec<Answer>, CallError>> {
            self.asked.lock().unwrap().push((radius.metres(), at.len()));
            let answers = at
                .iter()
                .map(|p| match p.lat * 1000.0 {
                    d if d >= 0.0 && d <= radius.metres() => Answer::Found(found(d)),
                    _ => Answer::NoPostcode,
                })
                .collect();
            Box::pin(std::future::ready(Ok(answers)))
        }
    }

    fn found(distance_m: f64) -> Match {
        Match {
            postcode: "AB1 0AA".into(),
            distance_m,
            area: Area::default(),
            raw: None,
        }
    }

    fn claimed(km: f64, stage: Stage) -> Claimed {
        Claimed {
            lat: km,
            lon: 0.0,
            stage,
            attempts: 3,
        }
    }

    #[test]
    fn stages_run_from_the_first_radius_to_widesearch() {
        let plan = SearchPlan::default();
        assert_eq!(plan.radius(Stage::Radius), Radius::Metres(100.0));
        assert_eq!(plan.radius(Stage::MaxRadius), Radius::Metres(2000.0));
        assert_eq!(plan.radius(Stage::Widesearch), Radius::Widesearch);
        assert_eq!(plan.next_stage(Stage::Radius), Some(Stage::MaxRadius));
        assert_eq!(plan.next_stage(Stage::MaxRadius), Some(Stage::Widesearch));
        assert_eq!(plan.next_stage(Stage::Widesearch), None);
        assert_eq!(plan.step(Stage::MaxRadius, None), Step::Next(Stage::Widesearch));
        assert_eq!(
            plan.step(Stage::MaxRadius, Some(found(5.0))),
            Step::Found(found(5.0))
        );
    }

    #[test]
    fn a_maximum_radius_no_larger_than_the_first_is_skipped_and_widesearch_may_be_off() {
        // postcodes.io clamps both to 2000 m: 5000 after 3000 would ask the same again.
        let plan = SearchPlan {
            radius_m: 3000.0,
            max_radius_m: 5000.0,
            widesearch: false,
        };
        assert_eq!(plan.next_stage(Stage::Radius), None);
        assert_eq!(plan.step(Stage::Radius, None), Step::NoMatch);
        let plan = SearchPlan {
            widesearch: true,
            ..plan
        };
        assert_eq!(plan.next_stage(Stage::Radius), Some(Stage::Widesearch));
    }

    #[tokio::test]
    async fn climb_asks_each_stage_once_for_all_its_coordinates() {
        let provider = Distances {
            asked: Mutex::new(vec![]),
        };
        // 0.05 km: found at 100 m; 1.5 km: at 2000 m; 15 km: widesearch;
        // -1: nowhere; 0.5 km but claimed at widesearch already.
        let items = [
            claimed(1.5, Stage::Radius),
            claimed(0.05, Stage::Radius),
            claimed(15.0, Stage::Radius),
            claimed(-1.0, Stage::Radius),
            claimed(0.5, Stage::Widesearch),
        ];
        let saved = climb(&provider, &SearchPlan::default(), &items).await;
        let outcomes: Vec<Option<f64>> = saved
            .iter()
            .map(|s| match &s.outcome {
                Outcome::Enriched(m) => Some(m.distance_m),
                Outcome::NoMatch => None,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            outcomes,
            [Some(1500.0), Some(50.0), Some(15000.0), None, Some(500.0)]
        );
        assert!(saved
            .iter()
            .zip(&items)
            .all(|(s, c)| (s.lat, s.attempts) == (c.lat, 3)));
        assert_eq!(
            *provider.asked.lock().unwrap(),
            [(100.0, 4), (2000.0, 3), (20_000.0, 3)],
            "each stage asked once, together"
        );
    }

    #[tokio::test]
    async fn claims_prefer_full_batches_of_later_stages() {
        let order = |pending: [i64; 3]| async move {
            stage_to_claim(
                100,
                |s, cap| async move { Ok(pending[s.as_i16() as usize].min(cap)) },
            )
            .await
            .unwrap()
        };
        assert_eq!(order([500, 100, 100]).await, Some(Stage::Widesearch));
        assert_eq!(order([500, 100, 99]).await, Some(Stage::MaxRadius));
        assert_eq!(order([500, 99, 99]).await, Some(Stage::Radius));
        assert_eq!(order([0, 99, 99]).await, Some(Stage::MaxRadius));
        assert_eq!(order([0, 0, 1]).await, Some(Stage::Widesearch));
        assert_eq!(order([0, 0, 0]).await, None);
    }
}
