//! `.shoalignore` rules, inherited from the ancestors of each directory.

use std::path::Path;
use std::sync::Arc;

use ignore::Match;
use ignore::gitignore::Gitignore;

/// The `.shoalignore` rules in force in one directory: its own file's, then its
/// ancestors'. The deepest rule that matches decides, as in git.
pub(super) struct IgnoreRules {
    pub(super) own: Option<Gitignore>,
    pub(super) parent: Option<Arc<IgnoreRules>>,
}

impl IgnoreRules {
    pub(super) fn none() -> Arc<Self> {
        Arc::new(IgnoreRules {
            own: None,
            parent: None,
        })
    }

    pub(super) fn is_ignored(&self, path: &Path, is_dir: bool) -> bool {
        let mut rules = Some(self);
        while let Some(level) = rules {
            if let Some(own) = &level.own {
                match own.matched(path, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
            rules = level.parent.as_deref();
        }
        false
    }
}
