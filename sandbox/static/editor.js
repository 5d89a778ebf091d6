// The article editor: sanitizes pasted HTML to the tag whitelist sandbox/markup.py enforces on the
// server, and publishes through a confirm dialog, as a real platform's editor does.
'use strict';

const ALLOWED_TAGS = new Set([
  'p', 'br', 'h1', 'h2', 'h3', 'h4', 'strong', 'em', 'code', 'pre', 'ul', 'ol', 'li', 'blockquote', 'a', 'img',
]);
const RENAMED_TAGS = { b: 'strong', i: 'em' };
const DROPPED_WITH_CONTENT = new Set([
  'script', 'style', 'template', 'iframe', 'object', 'embed', 'noscript', 'head', 'title', 'svg', 'math',
]);
const URL_ATTRIBUTE = { a: 'href', img: 'src' };
const SAFE_SCHEMES = { a: new Set(['http', 'https', 'mailto']), img: new Set(['http', 'https']) };
const EMPTY_CONTENT_MESSAGE = '发布内容不能为空';

function safeUrl(tag, value) {
  if (!value) return null;
  const cleaned = value.replace(/[\x00-\x20]/g, '').toLowerCase();
  if (tag === 'img' && cleaned.startsWith('data:image/')) return value.trim();
  const scheme = /^([a-z][a-z0-9+.-]*):/.exec(cleaned);
  return !scheme || SAFE_SCHEMES[tag].has(scheme[1]) ? value.trim() : null;
}

function copyAllowedChildren(source, target) {
  for (const node of source.childNodes) {
    if (node.nodeType === Node.TEXT_NODE) target.appendChild(document.createTextNode(node.data));
    else if (node.nodeType === Node.ELEMENT_NODE) copyAllowedElement(node, target);
  }
}

function copyAllowedElement(element, target) {
  if (DROPPED_WITH_CONTENT.has(element.localName)) return;
  const tag = RENAMED_TAGS[element.localName] || element.localName;
  if (!ALLOWED_TAGS.has(tag)) {
    copyAllowedChildren(element, target);
    return;
  }
  const url = URL_ATTRIBUTE[tag] ? safeUrl(tag, element.getAttribute(URL_ATTRIBUTE[tag])) : null;
  if (tag === 'img' && !url) return;
  const copy = document.createElement(tag);
  if (url) copy.setAttribute(URL_ATTRIBUTE[tag], url);
  copyAllowedChildren(element, copy);
  target.appendChild(copy);
}

function sanitizedFragment(html) {
  const parsed = new DOMParser().parseFromString(html, 'text/html');
  const fragment = document.createDocumentFragment();
  copyAllowedChildren(parsed.body, fragment);
  return fragment;
}

function plainTextFragment(text) {
  const fragment = document.createDocumentFragment();
  text.split(/\r?\n/).forEach((line, index) => {
    if (index > 0) fragment.appendChild(document.createElement('br'));
    fragment.appendChild(document.createTextNode(line));
  });
  return fragment;
}

function caretRangeIn(editor) {
  const selection = window.getSelection();
  if (selection.rangeCount && editor.contains(selection.getRangeAt(0).commonAncestorContainer)) {
    return selection.getRangeAt(0);
  }
  const end = document.createRange();
  end.selectNodeContents(editor);
  end.collapse(false);
  return end;
}

function insertAtCaret(editor, fragment) {
  const range = caretRangeIn(editor);
  const lastInserted = fragment.lastChild;
  range.deleteContents();
  range.insertNode(fragment);
  if (!lastInserted) return;
  range.setStartAfter(lastInserted);
  range.collapse(true);
  window.getSelection().removeAllRanges();
  window.getSelection().addRange(range);
}

function pasteSanitized(event) {
  event.preventDefault();
  const html = event.clipboardData.getData('text/html');
  const fragment = html ? sanitizedFragment(html) : plainTextFragment(event.clipboardData.getData('text/plain'));
  insertAtCaret(event.currentTarget, fragment);
}

function setUpEditor() {
  const title = document.getElementById('title');
  const editor = document.getElementById('editor');
  const error = document.getElementById('error');
  const dialog = document.getElementById('confirm-dialog');
  const confirmButton = document.getElementById('confirm-publish');

  function showError(message, code) {
    error.textContent = message;
    error.dataset.code = code || '';
    error.hidden = false;
  }

  function askToConfirm() {
    error.hidden = true;
    if (!title.value.trim() || !editor.textContent.trim()) {
      showError(EMPTY_CONTENT_MESSAGE, 'empty_content');
      return;
    }
    dialog.hidden = false;
    confirmButton.focus();
  }

  async function publish() {
    confirmButton.disabled = true;
    confirmButton.textContent = '发布中…';
    try {
      const answer = await fetch('/api/publish', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ title: title.value, body: editor.innerHTML }),
      });
      const payload = await answer.json().catch(() => ({}));
      if (answer.ok) {
        window.location.assign(`/p/${payload.id}`);
        return;
      }
      showError(payload.error ? payload.error.message : `发布失败（${answer.status}）`,
                payload.error ? payload.error.code : `http_${answer.status}`);
    } catch (networkFailure) {
      showError('网络异常，请稍后再试', 'network_error');
    }
    dialog.hidden = true;
    confirmButton.disabled = false;
    confirmButton.textContent = '确认发布';
  }

  document.execCommand('defaultParagraphSeparator', false, 'p');
  editor.addEventListener('paste', pasteSanitized);
  title.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.isComposing) event.preventDefault();
  });
  document.getElementById('publish-button').addEventListener('click', askToConfirm);
  document.getElementById('cancel-publish').addEventListener('click', () => { dialog.hidden = true; });
  confirmButton.addEventListener('click', publish);
}

setUpEditor();
